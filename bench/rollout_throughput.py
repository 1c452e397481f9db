"""Rollout tokens/s of the RLVR sampler (`smollm_kit.rlvr.sample_rollouts`) against `transformers`' `generate` on
the same weights exported to Hugging Face (SmolLM3ForCausalLM), on CPU.

    python bench/rollout_throughput.py [--new-tokens 64] [--threads N] [--d-model 256] [--layers 4]

Both sample `G` completions of each of `P` prompts at temperature 1 with no stop token, so every row produces
`--new-tokens` tokens: ours prefills each prompt once and copies its KV cache `G` times; `generate` gets
`num_return_sequences=G` (it repeats the prompt G times, then prefills all of them). Greedy outputs of the two are
compared first to check the weights are really the same model. Each case is timed `--repeats` times and the
fastest kept. Takes a minute or two on 2 CPU cores.
"""
import argparse, time
import torch
from smollm_kit.config import ModelConfig
from smollm_kit.model import SmolLM, count_params
from smollm_kit.rlvr import sample_rollouts
from smollm_kit.export import to_hf_config, to_hf_state_dict


def hf_copy(model):
    "The same weights as a transformers SmolLM3ForCausalLM (in memory)."
    from transformers import SmolLM3ForCausalLM
    hf = SmolLM3ForCausalLM(to_hf_config(model.cfg, pad_token_id=0))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
    assert not unexpected and all('lm_head' in k for k in missing), (missing, unexpected)
    if model.cfg.embed_scale: hf.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return hf.eval()


def ours(model, prompts, G, new, greedy=False):
    t = time.perf_counter()
    ro = sample_rollouts(model, prompts, G, new, 0.0 if greedy else 1.0, generator=torch.Generator().manual_seed(0))
    return ro.tokens, time.perf_counter() - t


@torch.no_grad()
def theirs(hf, prompts, G, new, greedy=False):
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      num_return_sequences=G, pad_token_id=0, eos_token_id=None, **kw)
    return out[:, ids.shape[1]:], time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--new-tokens', type=int, default=64)
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    p.add_argument('--d-model', type=int, default=256); p.add_argument('--layers', type=int, default=4)
    p.add_argument('--repeats', type=int, default=2, help='time each case this many times and keep the fastest')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=a.d_model, n_layers=a.layers, n_heads=4, n_kv_heads=2, ffn_dim=3 * a.d_model, vocab_size=2048,
                      max_seq_len=512, attn_backend='sdpa')
    model = SmolLM(cfg).eval()
    hf = hf_copy(model)
    n = count_params(cfg)
    print(f"model: d_model={cfg.d_model} n_layers={cfg.n_layers} ({n['total']/1e6:.1f}M params), fp32, CPU, "
          f"{torch.get_num_threads()} threads, temperature 1, no stop token, {a.new_tokens} new tokens per completion")
    pr = torch.randint(0, cfg.vocab_size, (2, 32)).tolist()
    g1, _ = ours(model, pr, 1, 16, greedy=True); g2, _ = theirs(hf, pr, 1, 16, greedy=True)
    same = g1.tolist() == g2.tolist()
    print(f"greedy check (2 prompts x 16 tokens): {'same tokens' if same else 'DIFFERENT tokens'}")
    ours(model, pr, 2, 4); theirs(hf, pr, 2, 4)                       # warm-up
    rows = []
    for P, G, L in [(1, 8, 64), (4, 8, 64), (4, 8, 256), (8, 4, 128)]:
        prompts = torch.randint(0, cfg.vocab_size, (P, L)).tolist()
        t_ours = min(ours(model, prompts, G, a.new_tokens)[1] for _ in range(a.repeats))   # best of N: the machine may be shared
        t_hf = min(theirs(hf, prompts, G, a.new_tokens)[1] for _ in range(a.repeats))
        toks = P * G * a.new_tokens
        rows.append((P, G, L, toks / t_ours, toks / t_hf, t_hf / t_ours))
    print(f"\n| prompts P | G | prompt len | ours tok/s | transformers tok/s | ratio (ours / HF) |")
    print(f"|---:|---:|---:|---:|---:|---:|")
    for P, G, L, o, h, r in rows: print(f"| {P} | {G} | {L} | {o:,.0f} | {h:,.0f} | {r:.2f}x |")


if __name__ == '__main__':
    main()
