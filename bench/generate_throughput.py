"""Tokens/s of `generate_ids` with and without the KV cache, on CPU, for a small random model.

    python bench/generate_throughput.py [--new-tokens 128] [--threads N]

Greedy decoding of random prompts (no EOS, so every row runs to `--new-tokens`). Without the cache, step n re-runs
all prompt + n tokens; with it, one token per step attends to the cached keys/values. The two must produce the same
tokens (checked). Takes well under a minute on 2 CPU cores.
"""
import argparse, time
import torch
from smollm_kit.config import ModelConfig
from smollm_kit.model import SmolLM, count_params
from smollm_kit.generate import generate_ids


def timed(model, prompts, new_tokens, use_cache):
    t = time.perf_counter()
    out = generate_ids(model, prompts, new_tokens, temperature=0, use_cache=use_cache)
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--new-tokens', type=int, default=128)
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768, vocab_size=2048, max_seq_len=512)
    model = SmolLM(cfg).eval()
    n = count_params(cfg)
    print(f"model: d_model={cfg.d_model} n_layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} "
          f"({n['total']/1e6:.1f}M params), fp32, CPU, {torch.get_num_threads()} threads, greedy, {a.new_tokens} new tokens")
    generate_ids(model, [[1, 2, 3]], 4, temperature=0)  # warm-up
    rows = []
    for batch, prompt_len in [(1, 16), (1, 128), (4, 64)]:
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len)).tolist()
        full, t_full = timed(model, prompts, a.new_tokens, use_cache=False)
        cached, t_cache = timed(model, prompts, a.new_tokens, use_cache=True)
        toks = batch * a.new_tokens
        rows.append((batch, prompt_len, toks / t_full, toks / t_cache, t_full / t_cache, full == cached))
    print(f"\n| batch | prompt | no cache tok/s | KV cache tok/s | speed-up | same tokens |")
    print(f"|---:|---:|---:|---:|---:|:---:|")
    for b, pl, f, c, r, same in rows: print(f"| {b} | {pl} | {f:,.0f} | {c:,.0f} | {r:.1f}x | {'yes' if same else 'NO'} |")


if __name__ == '__main__':
    main()
