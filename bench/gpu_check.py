"""GPU check: the paths CPU CI cannot cover, in one call on a lent GPU (about 5 minutes on an H100).

    python bench/gpu_check.py [--out DIR] [--quick]

1. environment: GPU, capability, native bf16, flash-attn / FlexAttention availability, chosen backend;
2. the CUDA-only model tests (`tests/test_model.py -k "gpu or cuda"`): flash / flex agree with sdpa, forward and backward;
3. peak memory of one bf16 forward+backward of `smollm-600m` at the reference micro-batch (48 x 2048) with activation
   checkpointing and the chunked loss (RECIPE.md claims ~25-30 GB);
4. training throughput and MFU of `smollm-600m` (bf16, micro-batch 16, Muon+AdamW), eager and torch.compile;
5. checkpoint stall of the 600M model (the synchronous part of `CheckpointManager.save`);
6. a short `tiny` pretraining run through the real trainer on CUDA (bf16 autocast), loss must fall.
Prints a table and writes gpu_check.json to --out.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path
import torch

def timed(fn, n=1):
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n

def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--out', default=os.environ.get('OUT', '.')); ap.add_argument('--quick', action='store_true')
    a = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
    from smollm_kit.config import load_config
    from smollm_kit.model import SmolLM, pick_attn_backend
    from smollm_kit.optim import build_optimizer
    from smollm_kit.monitor import flops_per_token, detect_gpu, hardware
    from smollm_kit.checkpoint import CheckpointManager
    res = {}
    gpu = detect_gpu(); res['gpu'] = gpu
    res['backend_auto'] = pick_attn_backend('auto', torch.device('cuda'))
    print('GPU', gpu, '\nauto backend', res['backend_auto'], flush=True)

    p = subprocess.run([sys.executable, '-m', 'pytest', '-q', 'tests/test_model.py', '-k', 'gpu or cuda', '-rs'], capture_output=True, text=True)
    res['gpu_tests'] = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
    print('gpu tests:', res['gpu_tests'], flush=True)

    cfg = load_config('pretrain')
    torch.manual_seed(0)
    model = SmolLM(cfg.model).cuda().set_activation_checkpointing(True)
    B, T = (8 if a.quick else 48), 2048
    x = torch.randint(0, cfg.model.vocab_size, (B, T), device='cuda')
    torch.cuda.reset_peak_memory_stats()
    def fb():
        with torch.autocast('cuda', dtype=torch.bfloat16): loss = model(x, labels=x)
        loss.backward()
    fb(); torch.cuda.synchronize()
    res['mem_peak_gb_600m_mb%d_ac' % B] = torch.cuda.max_memory_allocated() / 2**30
    print(f"600m bf16 fwd+bwd, micro-batch {B}x{T}, activation ckpt: peak {res['mem_peak_gb_600m_mb%d_ac' % B]:.1f} GiB", flush=True)
    model.zero_grad(set_to_none=True)

    fpt, peak = flops_per_token(cfg.model, T), hardware(cfg.cost)['peak_tflops']
    opt = build_optimizer(model, cfg.optim)
    mb = 16; xb = torch.randint(0, cfg.model.vocab_size, (mb, T), device='cuda')
    for compiled in ([False] if a.quick else [False, True]):
        model.set_activation_checkpointing(False)
        m = torch.compile(model) if compiled else model
        def step():
            with torch.autocast('cuda', dtype=torch.bfloat16): loss = m(xb, labels=xb)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        for _ in range(3): step()
        dt = timed(step, 5)
        tps = mb * T / dt
        res[f'tokens_per_sec_600m_{"compiled" if compiled else "eager"}'] = tps
        res[f'mfu_600m_{"compiled" if compiled else "eager"}'] = tps * fpt / (peak * 1e12) if peak else None
        print(f"600m train step mb {mb}x{T} {'compiled' if compiled else 'eager'}: {tps:,.0f} tok/s, MFU {tps*fpt/(peak*1e12):.1%}", flush=True)

    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d, cfg.checkpoint)
        t = time.perf_counter()
        mgr.save(1, model.state_dict(), {'optim': opt.state_dict()})
        res['ckpt_stall_s_600m'] = time.perf_counter() - t
        t = time.perf_counter(); mgr.wait(); res['ckpt_background_write_s_600m'] = time.perf_counter() - t + res['ckpt_stall_s_600m']
        print(f"checkpoint stall {res['ckpt_stall_s_600m']:.2f} s (complete on disk after {res['ckpt_background_write_s_600m']:.1f} s)", flush=True)
    del model, opt; torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as d:
        from smollm_kit.pretrain import pretrain
        r = pretrain(load_config('tiny', {'run.run_dir': d, 'train.max_steps': 60, 'logging.every_steps': 10, 'logging.progress': False}))
        recs = [json.loads(l) for l in open(Path(d)/'metrics.jsonl')]
        ls = [r_['train/loss'] for r_ in recs if 'train/loss' in r_]
        res['tiny_cuda_loss_first_last'] = (ls[0], ls[-1])
        print('tiny on CUDA: loss', ls[0], '->', ls[-1], flush=True)

    print('\n| check | value |\n|---|---|')
    for k, v in res.items(): print(f'| {k} | {v} |')
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out)/'gpu_check.json').write_text(json.dumps(res, indent=1, default=str))

if __name__ == '__main__': main()
