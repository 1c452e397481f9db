"""Training tokens/s of smollm_kit's SmolLM against transformers' SmolLM3ForCausalLM of the same shape.

Same parameters (our weights are copied into the HF model), same batch, fp32, CPU, AdamW on both; forward +
backward + optimizer step, timed after warm-up, interleaved so both see the same machine load.

    python bench/train_throughput.py [--d-model 512 --layers 4 --seq 256 --batch 4 --steps 10]
"""
import argparse, statistics, time
import torch
from transformers import SmolLM3ForCausalLM
from smollm_kit.config import ModelConfig
from smollm_kit.model import SmolLM
from smollm_kit.export import to_hf_config, to_hf_state_dict

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--d-model', type=int, default=512); ap.add_argument('--layers', type=int, default=4)
    ap.add_argument('--heads', type=int, default=8); ap.add_argument('--kv-heads', type=int, default=4)
    ap.add_argument('--ffn', type=int, default=1536); ap.add_argument('--vocab', type=int, default=32000)
    ap.add_argument('--seq', type=int, default=256); ap.add_argument('--batch', type=int, default=4)
    ap.add_argument('--steps', type=int, default=10); ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--loss-chunk', type=int, default=4096, help='model.loss_chunk_size')
    a = ap.parse_args()
    torch.manual_seed(0)
    mc = ModelConfig(d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, ffn_dim=a.ffn,
                     vocab_size=a.vocab, max_seq_len=max(a.seq, 512), attn_backend='sdpa', loss_chunk_size=a.loss_chunk)
    ours = SmolLM(mc)
    hf = SmolLM3ForCausalLM(to_hf_config(mc))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), mc))
    hf.config.use_cache = False
    x = torch.randint(0, a.vocab, (a.batch, a.seq))
    with torch.no_grad():
        ref = hf(input_ids=x, labels=x).loss.item()
        y = torch.full_like(x, -100); y[:, :-1] = x[:, 1:]
        mine = ours(x, targets=y).item()
    assert abs(ref - mine) < 1e-3, (ref, mine)  # the same model, the same loss

    y = torch.full_like(x, -100); y[:, :-1] = x[:, 1:]
    steps = {'smollm_kit': lambda: ours(x, targets=y), 'transformers SmolLM3': lambda: hf(input_ids=x, labels=x).loss}
    opts = {'smollm_kit': torch.optim.AdamW(ours.parameters(), 1e-4), 'transformers SmolLM3': torch.optim.AdamW(hf.parameters(), 1e-4)}
    times = {k: [] for k in steps}
    for i in range(a.warmup + a.steps):
        for k, f in steps.items():
            t = time.perf_counter()
            loss = f(); loss.backward(); opts[k].step(); opts[k].zero_grad(set_to_none=True)
            if i >= a.warmup: times[k].append(time.perf_counter() - t)
    tokens = a.batch * a.seq
    n = sum(p.numel() for p in ours.parameters())
    print(f"shape d_model={a.d_model} layers={a.layers} heads={a.heads}/{a.kv_heads} ffn={a.ffn} vocab={a.vocab}; "
          f"{n/1e6:.1f}M params; batch {a.batch}x{a.seq}; fp32 CPU, {torch.get_num_threads()} threads; median of {a.steps} steps")
    print(f"{'model':<22}{'ms/step':>10}{'tokens/s':>12}{'ratio':>8}")
    base = statistics.median(times['transformers SmolLM3'])
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"{k:<22}{m*1e3:>10.1f}{tokens/m:>12,.0f}{base/m:>8.2f}")

if __name__ == '__main__': main()
