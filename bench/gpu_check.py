"""GPU check: everything CPU CI cannot measure, in one call on a lent GPU (under 8 minutes on an H100/H200).

    PYTHONPATH=. python bench/gpu_check.py --out $OUT            # the full check (~6 min)
    PYTHONPATH=. python bench/gpu_check.py --out $OUT --quick    # a ~3-minute smoke run
    PYTHONPATH=. python bench/gpu_check.py --dry-run --out /tmp/x # the whole flow on CPU with a tiny shape (CI)
    ... --only attention,train_eager                             # a subset of the sections

Needs only torch, transformers, safetensors, tokenizers, numpy, pyyaml, tqdm (no datasets, wandb, IPython, pytest,
flash-attn). Sections, each in its own try/except with its own time budget; `gpu_check.json` in --out is rewritten
after every section, so a run cut short still leaves data:

- env: GPU, peak TFLOP/s, torch / CUDA / transformers versions, attention backend `auto` picks, missing packages;
- attention: flash / flex agree with sdpa on packed rows with document masks, forward and backward, and a token
  never sees another document (flash skipped with the reason when flash_attn is absent);
- train_eager, train_hf, train_blocks, train_whole: 600M (`smollm-600m`) training step (bf16 autocast, Muon+AdamW,
  forward + backward + optimizer step) tokens/s and MFU, eager, `model.compile_blocks()` and `torch.compile(model)`,
  and transformers' `SmolLM3ForCausalLM` (sdpa) with the same weights, batch and optimizer -> ratio;
- profile: torch.profiler over a few steps: top CUDA kernels and the share of CUDA time by kind (gemm, attention...);
- trainer: the whole `Trainer` (data, logging, checkpoints) against the bare step on the same batch -> overhead %;
- checkpoint: stall of an async save of the 600M training state (weights + optimizer);
- generate: rollout tokens/s of RLVR's `sample_rollouts` and of chat's `generate_ids` (KV cache, batched) against
  `transformers` `generate` -> ratios;
- memory: peak memory of a step at the reference micro-batch (48 x 2048) with and without activation checkpointing;
- precision_fp16: the path a T4 takes (fp16 autocast + GradScaler, sdpa with a document mask);
- dtype_audit: every matmul / attention op of forward + backward under bf16 autocast, with its dtypes.

The goals in the table are benchmarks, not tests. MFU = tokens/s x `flops_per_token` / the GPU's peak (dense bf16).
"""
from __future__ import annotations
import argparse, collections, contextlib, gc, importlib, importlib.util, inspect, json, math, os, platform, re, signal
import shutil, sys, tempfile, time, traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the kit
import torch

GOALS = {  # what the 600M recipe needs on one H100/H200; printed beside the measurements
    'mfu_bare_step': ('>= 45%', lambda v: v >= 0.45),
    'kit_vs_transformers': ('>= 1.3x', lambda v: v >= 1.3),
    'trainer_overhead_pct': ('<= 5%', lambda v: v <= 5),
    'checkpoint_stall_s': ('< 2 s', lambda v: v < 2),
    'rollout_vs_generate': ('>= 2x', lambda v: v >= 2),
    'non_bf16_matmuls': ('0', lambda v: v == 0),
    'attention_backends_agree': ('yes', lambda v: v is True),
}
SECTIONS = ['env', 'attention', 'train_eager', 'train_hf', 'train_blocks', 'profile', 'trainer', 'checkpoint',
            'generate', 'memory', 'precision_fp16', 'dtype_audit', 'train_whole']


class Skip(Exception):
    "A section (or part) that cannot run here; the message says why."

class SectionTimeout(BaseException):
    "Raised by the alarm when a section exceeds its budget (a BaseException, so no library `except Exception` eats it)."


# --- plumbing -----------------------------------------------------------------------------------------------------

def free():
    "Release cached GPU memory (after a section, an OOM, a timeout)."
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.synchronize(); torch.cuda.empty_cache()

def sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()

@contextlib.contextmanager
def time_limit(seconds:float):
    "Raise `SectionTimeout` in the main thread after `seconds` (SIGALRM; main thread, POSIX)."
    if seconds is None or not hasattr(signal, 'setitimer'): yield; return
    def on_alarm(signum, frame): raise SectionTimeout(f"time budget of {seconds:.0f} s exceeded")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try: yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

def autocast(dev:torch.device, dtype):
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

def is_oom(e:BaseException)->bool:
    return isinstance(e, torch.OutOfMemoryError) or 'out of memory' in str(e).lower()

def target_kw()->str:
    "The model forward's name for next-token targets: 'targets' ('labels' in kits from before the rename)."
    from smollm_kit.model import SmolLM
    return 'targets' if 'targets' in inspect.signature(SmolLM.forward).parameters else 'labels'

def kit_loss(model, ids, docs, tgt):
    "Mean next-token loss of the kit's model (targets already shifted)."
    return model(ids, doc_ids=docs, **{target_kw(): tgt})

def make_batch(B:int, T:int, V:int, dev, packed:bool=False, mean_doc:int=512, seed:int=0):
    "(ids, doc_ids or None, targets): random tokens; `packed`: documents of random length, targets -100 at their ends."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    docs = None
    if packed:
        starts = torch.rand(B, T, generator=g) < 1.0 / mean_doc
        starts[:, 0] = False
        docs = starts.long().cumsum(1)
    tgt = torch.full_like(ids, -100)
    tgt[:, :-1] = ids[:, 1:]
    if docs is not None: tgt[:, :-1][docs[:, 1:] != docs[:, :-1]] = -100
    return ids.to(dev), (docs.to(dev) if docs is not None else None), tgt.to(dev)

def build_kit(mc, dev, seed:int=0):
    "A SmolLM with fp32 weights, initialised directly on `dev` (no 600M CPU init + copy)."
    from smollm_kit.model import SmolLM
    torch.manual_seed(seed)
    with torch.device(dev): return SmolLM(mc)

def timed_steps(step, warmup:int, n:int)->tuple[float, float, float]:
    "(seconds per step, seconds of the first warm-up step, last loss) of `step()` after `warmup` calls."
    t = time.perf_counter(); loss = step(); sync(); first = time.perf_counter() - t
    for _ in range(warmup - 1): loss = step()
    sync(); t = time.perf_counter()
    for _ in range(n): loss = step()
    sync()
    return (time.perf_counter() - t) / n, first, float(loss)

def train_step(fwd, opt, batch, dev, amp, loss_fn=kit_loss, scaler=None, clip=None, params=None):
    "A closure running one optimizer step (forward, backward, [unscale, clip], step) and returning the loss tensor."
    ids, docs, tgt = batch
    def step():
        with autocast(dev, amp): loss = loss_fn(fwd, ids, docs, tgt)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if clip: torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(opt); scaler.update()
        else:
            loss.backward()
            if clip: torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


class Check:
    "Runs the sections, keeps the results, writes them after each section."
    def __init__(self, a):
        self.a, self.t_start = a, time.perf_counter()
        self.dev = torch.device('cuda' if torch.cuda.is_available() and not a.dry_run else 'cpu')
        self.cuda = self.dev.type == 'cuda'
        self.mode = 'dry-run' if a.dry_run else 'quick' if a.quick else 'full'
        self.out = Path(a.out); self.out.mkdir(parents=True, exist_ok=True)
        self.res = {'mode': self.mode, 'argv': sys.argv[1:], 'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                    'sections': {}, 'summary': {}}
        self.keep = {}  # objects handed from one section to the next (the compiled-blocks model for the profile)
        from smollm_kit.config import ModelConfig, MODEL_PRESETS, load_config
        from smollm_kit.monitor import flops_per_token, gpu_spec, detect_gpu
        self.gpu = detect_gpu() if self.cuda else dict(name='CPU (dry run)', cuda=False, memory_gb=None)
        spec = gpu_spec(self.gpu['name']) if self.cuda else None
        self.peak = spec['peak_tflops'] * 1e12 if spec else None
        if a.dry_run:   # the tiny preset, a short context, a batch of 2: every code path, no speed
            self.mc = ModelConfig(**{**MODEL_PRESETS['tiny'], 'preset': 'tiny'})
            self.T, self.mb, self.warm, self.steps, self.ref_mb = 64, 2, 1, 2, 2
        else:
            self.mc = load_config('pretrain').model     # smollm-600m, attn_backend auto
            big = (self.gpu.get('memory_gb') or 0) >= 120  # H200 141 GB: 16 x 2048 without activation checkpointing
            self.T, self.ref_mb = 2048, 48
            self.mb = (8 if big else 4) if a.quick else (16 if big else 8)
            self.warm, self.steps = (2, 3) if a.quick else (3, 6)
        if a.micro_batch: self.mb = a.micro_batch
        self.amp = torch.bfloat16 if (self.cuda or a.dry_run) else None
        self.fpt = flops_per_token(self.mc, self.T)
        self.budget = a.budget or {'full': 450, 'quick': 180, 'dry-run': 300}[self.mode]

    def remaining(self)->float: return self.budget - (time.perf_counter() - self.t_start)

    def mfu(self, tps): return tps * self.fpt / self.peak if self.peak and tps else None

    def write(self):
        self.res['elapsed_s'] = round(time.perf_counter() - self.t_start, 1)
        self.res['summary'] = self.summary()
        tmp = self.out/'gpu_check.json.tmp'
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        tmp.replace(self.out/'gpu_check.json')

    def run(self, name:str, fn, budget:float):
        "Run one section with its budget; record values, skip reason, or the error; never raise."
        rec = {'status': 'running'}
        self.res['sections'][name] = rec
        left = self.remaining()
        t = time.perf_counter()
        print(f"\n== {name} (budget {min(budget, max(left, 0)):.0f} s)", flush=True)
        try:
            if left < 10: raise Skip(f"out of time: {left:.0f} s of the {self.budget:.0f} s budget left")
            with time_limit(min(budget, left)): rec.update(fn() or {})
            rec['status'] = rec.get('status_override', 'ok'); rec.pop('status_override', None)
        except Skip as e: rec['status'] = f'skipped: {e}'
        except SectionTimeout as e: rec['status'] = f'timeout: {e}'
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt): raise
            rec['status'] = f"{'OOM' if is_oom(e) else 'error'}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rec['traceback'] = traceback.format_exc()[-3000:]
        rec['seconds'] = round(time.perf_counter() - t, 1)
        print(f"   {name}: {rec['status']} ({rec['seconds']} s) " +
              json.dumps({k: v for k, v in rec.items() if k not in ('status', 'seconds', 'traceback')}, default=str)[:600], flush=True)
        if name != 'train_blocks': self.keep.pop('blocks', None)  # the compiled model lives on only for the profile
        free()
        self.write()

    # --- summary ----------------------------------------------------------------------------------------------------
    def summary(self)->dict:
        s, S = {}, self.res['sections']
        g = lambda sec, k: S.get(sec, {}).get(k)
        kit = {m: g(f'train_{m}', 'tokens_per_sec') for m in ('eager', 'blocks', 'whole')}
        best = max((v for v in kit.values() if v), default=None)
        s['mfu_bare_step'] = max((g(f'train_{m}', 'mfu') or 0 for m in kit), default=None) or None
        hf, hf_mb = g('train_hf', 'hf_tokens_per_sec'), g('train_hf', 'micro_batch')
        if hf:
            same = [v for m, v in kit.items() if v and g(f'train_{m}', 'micro_batch') == hf_mb] + [g('train_hf', 'kit_eager_tokens_per_sec') or 0]
            s['kit_vs_transformers'] = max(same) / hf
        s['trainer_overhead_pct'] = g('trainer', 'overhead_pct')
        stalls = [v for v in (g('checkpoint', 'stall_s_later'), g('trainer', 'checkpoint_stall_s')) if v is not None]
        s['checkpoint_stall_s'] = max(stalls) if stalls else None
        s['rollout_vs_generate'] = g('generate', 'rollout_ratio')   # RLVR's sampler: what rollouts run on
        s['non_bf16_matmuls'] = g('dtype_audit', 'non_bf16_count')
        s['attention_backends_agree'] = g('attention', 'agree')
        s['best_kit_tokens_per_sec'] = best
        return s

    def table(self)->str:
        S, s = self.res['sections'], self.summary()
        lines = [f"smollm_kit GPU check ({self.mode}) on {self.gpu['name']}; torch {torch.__version__}; "
                 f"model {self.mc.preset} d={self.mc.d_model} L={self.mc.n_layers} T={self.T}; {self.res['elapsed_s']} s",
                 '', '| goal | value | target | met |', '|---|---|---|---|']
        for k, (tgt, ok) in GOALS.items():
            v = s.get(k)
            met = '' if v is None or self.a.dry_run else ('yes' if ok(v) else 'NO')  # a dry run measures nothing
            vs = 'n/a' if v is None else f'{v:.1%}' if k == 'mfu_bare_step' else f'{v:.2f}x' if k in ('kit_vs_transformers', 'rollout_vs_generate') else \
                 f'{v:.1f}%' if k.endswith('pct') else f'{v:.2f}' if isinstance(v, float) else str(v)
            lines.append(f'| {k} | {vs} | {tgt} | {met} |')
        lines += ['', '| section | status | s | key numbers |', '|---|---|---|---|']
        keys = {'env': ['gpu', 'peak_tflops', 'attn_backend_auto'],
                'attention': ['agree', 'flex', 'flash'],
                'train_eager': ['micro_batch', 'tokens_per_sec', 'mfu', 'tokens_per_sec_packed', 'attn_backend'],
                'train_hf': ['micro_batch', 'hf_tokens_per_sec', 'kit_eager_tokens_per_sec', 'ratio_eager', 'loss_diff'],
                'train_blocks': ['micro_batch', 'tokens_per_sec', 'mfu', 'first_step_s'],
                'train_whole': ['micro_batch', 'tokens_per_sec', 'mfu', 'first_step_s'],
                'profile': ['model', 'busy_frac', 'by_kind', 'top'],
                'trainer': ['data', 'trainer_tokens_per_sec', 'bare_tokens_per_sec', 'overhead_pct', 'checkpoint_stall_s'],
                'checkpoint': ['gb', 'stall_s_first', 'stall_s_later', 'write_s'],
                'generate': ['batch', 'new_tokens', 'rollout_tokens_per_sec', 'kit_tokens_per_sec', 'hf_tokens_per_sec', 'rollout_ratio', 'ratio'],
                'memory': ['micro_batch', 'peak_gib_ac', 'peak_gib_no_ac'],
                'precision_fp16': ['tokens_per_sec', 'bf16_tokens_per_sec', 'loss_fp16_vs_bf16', 'scale'],
                'dtype_audit': ['ops_forward', 'ops_backward', 'non_bf16_count', 'non_bf16']}
        def fmt(v):
            if isinstance(v, float): return f'{v:.3g}' if abs(v) < 1e4 else f'{v:,.0f}'
            if isinstance(v, (list, dict)): return json.dumps(v, default=str)[:160]
            return str(v)
        for name in SECTIONS:
            if name not in S: continue
            r = S[name]
            kv = '; '.join(f'{k} {fmt(r[k])}' for k in keys.get(name, []) if r.get(k) is not None)
            lines.append(f"| {name} | {r['status'][:90]} | {r.get('seconds', '')} | {kv} |")
        return '\n'.join(lines)


# --- sections -----------------------------------------------------------------------------------------------------

def sec_env(c:Check)->dict:
    from smollm_kit.model import pick_attn_backend
    import transformers
    missing = [m for m in ('datasets', 'wandb', 'IPython', 'ipywidgets', 'flash_attn', 'triton', 'pytest')
               if importlib.util.find_spec(m) is None]
    d = dict(gpu=c.gpu['name'], capability=c.gpu.get('capability'), memory_gb=c.gpu.get('memory_gb'),
             peak_tflops=c.peak / 1e12 if c.peak else None, torch=torch.__version__, cuda=torch.version.cuda,
             transformers=transformers.__version__, python=platform.python_version(), cpus=os.cpu_count(),
             packages_missing=missing, device=str(c.dev), micro_batch=c.mb, seq_len=c.T,
             flops_per_token=c.fpt, params_m=sum(p.numel() for p in build_kit(c.mc, 'meta').parameters()) / 1e6)
    d['attn_backend_auto'], d['attn_backend_reason'] = pick_attn_backend('auto', c.dev)
    return d

def sec_attention(c:Check)->dict:
    "flex / flash against sdpa on packed rows: logits, loss, every gradient; and document isolation."
    import dataclasses
    from smollm_kit.model import pick_attn_backend
    mc = dataclasses.replace(c.mc, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=1024,
                             max_seq_len=512, nope_every=2, attn_backend='sdpa', preset=None)
    B, T = (2, 64) if c.a.dry_run else (4, 512)
    ids, docs, tgt = make_batch(B, T, mc.vocab_size, c.dev, packed=True, mean_doc=T // 5, seed=1)
    docs[0, 7] = docs[0, 6] + 1; docs[0, 8:] += 2                       # a one-token document
    tgt = tgt.clone(); tgt[:, :-1][docs[:, 1:] != docs[:, :-1]] = -100
    ids2 = ids.clone(); first = docs == docs[:, :1]; ids2[first] = (ids2[first] + 1) % mc.vocab_size  # change doc 0 only
    amp = torch.bfloat16 if c.cuda else None
    ref = build_kit(mc, c.dev)
    def run(m, grad:bool):
        m.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad), autocast(c.dev, amp):
            logits = m(ids, docs).float()
            logits2 = m(ids2, docs).float()
            loss = kit_loss(m, ids, docs, tgt)
        if grad: loss.backward()
        iso = (logits - logits2)[~first].abs().max().item()          # other documents must not change
        return logits.detach(), loss.detach().float(), {n: p.grad for n, p in m.named_parameters()} if grad else None, iso
    r_logits, r_loss, r_grads, r_iso = run(ref, True)
    out, agree = {'sdpa_isolation_max_diff': r_iso, 'shape': f'{B}x{T}, {int(docs.max()) + 1} docs/row max'}, r_iso < 1e-3
    tol = dict(logits=5e-2, loss=1e-2, grad=5e-2) if amp else dict(logits=1e-4, loss=1e-5, grad=1e-4)
    for be in ('flex', 'flash'):
        try: pick_attn_backend(be, c.dev)
        except ValueError as e: out[be] = f'skipped: {e}'; continue
        other = build_kit(dataclasses.replace(mc, attn_backend=be), c.dev); other.load_state_dict(ref.state_dict())
        grad = c.cuda
        logits, loss, grads, iso = run(other, grad)
        d = dict(logits_max_abs_diff=(logits - r_logits).abs().max().item(), loss_diff=abs(loss - r_loss).item(),
                 isolation_max_diff=iso)
        if grad:
            d['grad_max_rel_diff'] = max(((grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in r_grads.items())
        ok = d['logits_max_abs_diff'] < tol['logits'] and d['loss_diff'] < tol['loss'] and iso < 1e-3 and d.get('grad_max_rel_diff', 0) < tol['grad']
        d['ok'] = ok
        if not grad: d['backward'] = 'skipped: no CUDA (flex has no CPU backward)'
        out[be] = d; agree = agree and ok
        del other
    out['agree'] = agree
    return out

def _kit_train(c:Check, mode:str, mb:int, packed:bool=False, keep:bool=False)->dict:
    "Tokens/s and MFU of the kit's bf16 training step in `mode` ('eager', 'blocks', 'whole')."
    from smollm_kit.config import load_config
    from smollm_kit.optim import build_optimizer
    model = build_kit(c.mc, c.dev)
    opt = build_optimizer(model, load_config('tiny').optim)
    fwd = model
    if mode == 'blocks': model.compile_blocks()
    if mode == 'whole': fwd = torch.compile(model)
    if mode != 'eager':
        from torch._dynamo.utils import counters
        counters.clear()
    batch = make_batch(mb, c.T, c.mc.vocab_size, c.dev, packed=packed)
    dt, first, loss = timed_steps(train_step(fwd, opt, batch, c.dev, c.amp), c.warm, c.steps)
    tps = mb * c.T / dt
    if keep: c.keep['blocks'] = (model, opt, batch)
    d = dict(micro_batch=mb, tokens_per_sec=tps, mfu=c.mfu(tps), ms_per_step=dt * 1e3, first_step_s=first, loss=loss,
             attn_backend=model.attn_backend)
    if mode != 'eager':  # did the compile cover what it should? (graph breaks, recompiles)
        d['dynamo'] = dict(unique_graphs=counters['stats'].get('unique_graphs'), graph_breaks=sum(counters['graph_break'].values()),
                           break_reasons=[k[:120] for k, _ in counters['graph_break'].most_common(3)],
                           recompile_limit_hits=sum(v for k, v in counters['stats'].items() if 'limit' in k))
    return d

def with_oom_retry(c:Check, fn, mb:int, rec:dict):
    "fn(mb), halving mb on CUDA out-of-memory (recorded in rec['oom_at'])."
    while True:
        oom = False
        try: return fn(mb)
        except BaseException as e:
            if not is_oom(e) or mb <= 1: raise
            oom = True
        if oom:
            rec.setdefault('oom_at', []).append(mb)
            c.keep.pop('blocks', None); free()
            mb //= 2
            print(f"   OOM: retrying with micro-batch {mb}", flush=True)

def sec_train_eager(c:Check)->dict:
    rec = {}
    rec.update(with_oom_retry(c, lambda mb: _kit_train(c, 'eager', mb), c.mb, rec))
    free()
    p = _kit_train(c, 'eager', rec['micro_batch'], packed=True)
    rec['tokens_per_sec_packed'], rec['mfu_packed'] = p['tokens_per_sec'], p['mfu']
    rec['note'] = 'plain causal rows (doc_ids None); _packed: rows of ~512-token documents (doc_ids given)'
    return rec

def sec_train_compiled(c:Check, mode:str)->dict:
    if c.a.dry_run: raise Skip('dry-run: torch.compile (inductor) takes minutes on 2 CPU cores; the eager path ran')
    if mode == 'whole' and c.a.quick: raise Skip('--quick skips the whole-model compile')
    rec = {}
    rec.update(with_oom_retry(c, lambda mb: _kit_train(c, mode, mb, keep=mode == 'blocks'), c.mb, rec))
    return rec

def _hf_model(c:Check, kit, dtype=None):
    from transformers import SmolLM3ForCausalLM
    from smollm_kit.export import to_hf_config, to_hf_state_dict
    hc = to_hf_config(c.mc)
    hc._attn_implementation = 'sdpa'
    with torch.device(c.dev): hf = SmolLM3ForCausalLM(hc)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(kit.state_dict(), c.mc), strict=False)
    bad = [k for k in missing if not k.endswith('rotary_emb.inv_freq')]
    if bad or unexpected: raise RuntimeError(f"HF state dict mismatch: missing {bad[:3]}, unexpected {unexpected[:3]}")
    if dtype is not None: hf = hf.to(dtype)
    return hf

def hf_loss(hf, ids, docs, tgt): return hf(input_ids=ids, labels=ids, use_cache=False).loss

def sec_train_hf(c:Check)->dict:
    "transformers' SmolLM3ForCausalLM (sdpa), the same weights, batch, optimizer and autocast as the kit."
    from smollm_kit.config import load_config
    from smollm_kit.optim import build_optimizer
    rec = {}
    kit = build_kit(c.mc, c.dev)
    hf = _hf_model(c, kit)
    hf.config.use_cache = False
    ids, docs, tgt = make_batch(2, min(c.T, 256), c.mc.vocab_size, c.dev)
    with torch.no_grad(), autocast(c.dev, c.amp):
        rec['loss_kit'] = kit_loss(kit, ids, None, tgt).item(); rec['loss_hf'] = hf_loss(hf, ids, None, None).item()
    rec['loss_diff'] = abs(rec['loss_kit'] - rec['loss_hf'])
    if rec['loss_diff'] > (5e-2 if c.amp else 1e-3): rec['warning'] = 'kit and transformers losses differ: not the same model'
    del kit; free()
    optim_cfg = load_config('tiny').optim
    rec['hf_attn_implementation'] = getattr(hf.config, '_attn_implementation', None)
    def hf_run(mb):
        hf.zero_grad(set_to_none=True)  # an OOM retry must not carry the failed step's gradients
        opt = build_optimizer(hf, optim_cfg)
        batch = make_batch(mb, c.T, c.mc.vocab_size, c.dev)
        dt, first, loss = timed_steps(train_step(hf, opt, batch, c.dev, c.amp, loss_fn=hf_loss), c.warm, c.steps)
        del opt; hf.zero_grad(set_to_none=True)
        return dict(micro_batch=mb, hf_tokens_per_sec=mb * c.T / dt, hf_mfu=c.mfu(mb * c.T / dt), hf_loss_last=loss)
    rec.update(with_oom_retry(c, hf_run, c.mb, rec))
    del hf; free()
    k = _kit_train(c, 'eager', rec['micro_batch'])
    rec['kit_eager_tokens_per_sec'] = k['tokens_per_sec']
    rec['ratio_eager'] = k['tokens_per_sec'] / rec['hf_tokens_per_sec']
    return rec

def sec_profile(c:Check)->dict:
    "torch.profiler over 3 steps of the compiled-blocks model (eager if that section did not run): where CUDA time goes."
    from torch.profiler import profile, ProfilerActivity
    if 'blocks' in c.keep: model, opt, batch = c.keep.pop('blocks'); what = 'compile_blocks'
    else:
        from smollm_kit.config import load_config
        from smollm_kit.optim import build_optimizer
        model = build_kit(c.mc, c.dev); opt = build_optimizer(model, load_config('tiny').optim)
        batch = make_batch(c.mb, c.T, c.mc.vocab_size, c.dev); what = 'eager'
    step = train_step(model, opt, batch, c.dev, c.amp)
    for _ in range(2): step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if c.cuda else [])
    n = 3
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(n): step()
        sync(); wall = time.perf_counter() - t
    ev = prof.key_averages()
    dev_t = lambda e: getattr(e, 'self_device_time_total', None) or getattr(e, 'self_cuda_time_total', 0) or 0
    if c.cuda:
        rows = [(e.key, dev_t(e), e.count) for e in ev if str(getattr(e, 'device_type', '')).endswith('CUDA') and dev_t(e) > 0]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in ev if e.self_cpu_time_total > 0]
    total = sum(t for _, t, _ in rows) or 1
    kinds = [('gemm', r'gemm|xmma|cutlass|nvjet|cublas|wgmma|splitk|mm_'), ('attention', r'flash|fmha|attention|flex|triton_tem'),
             ('optimizer', r'multi_tensor|foreach|adam|muon|newton'), ('copy/memset', r'memcpy|memset|copy'),
             ('triton fused', r'^triton_'), ('elementwise/reduce', r'elementwise|vectorized|reduce|softmax|norm|cat|index|scatter|gather')]
    by = collections.Counter()
    for k, t, _ in rows:
        by[next((name for name, pat in kinds if re.search(pat, k, re.I)), 'other')] += t
    top = sorted(rows, key=lambda r: -r[1])[:12]
    tokens = n * batch[0].numel()
    return dict(model=what, steps=n, micro_batch=batch[0].shape[0], wall_s=wall,
                busy_frac=(total / 1e6) / wall if c.cuda else None, unit='CUDA kernel time' if c.cuda else 'CPU op self time',
                tokens_per_sec_under_profiler=tokens / wall,
                by_kind={k: round(v / total, 3) for k, v in by.most_common()},
                top=[dict(name=k[:100], share=round(t / total, 4), ms_per_step=round(t / 1e3 / n, 3), calls=cnt // n) for k, t, cnt in top])

def _synthetic_stage(B:int, T:int, V:int, key:str):
    "A pretraining Stage serving random packed batches: the Trainer without a data pipeline."
    from smollm_kit.trainer import Stage
    class Synthetic(Stage):
        name, i = 'pretrain', 0
        def next_batch(self, ctx=None):
            self.i += 1
            ids, docs, tgt = make_batch(B, T, V, 'cpu', packed=True, seed=self.i)
            return {'input_ids': ids, 'doc_ids': docs, key: tgt}
        def loss(self, model, batch):
            tgt = batch[key]
            return model(batch['input_ids'], doc_ids=batch.get('doc_ids'), **{key: tgt}, reduction='sum'), (tgt != -100).sum(), {}
        def state_dict(self): return {'i': self.i}
        def load_state_dict(self, sd): self.i = sd['i']
    return Synthetic()

def _demo_stage(c:Check, cfg, model, work:Path):
    "The pretrain stage on the demo corpus, with a small BPE trained here (a 32k demo BPE takes too long to train)."
    P = importlib.import_module('smollm_kit.pretrain')  # `from smollm_kit import pretrain` is the function
    from smollm_kit.data import demo_corpus, train_tokenizer
    from transformers import AutoTokenizer
    corpus = demo_corpus(cfg.data.cache_dir)
    texts = []
    for k in ('prose', 'code', 'math'):
        with open(corpus/f'{k}.jsonl', encoding='utf-8') as f:
            for i, line in enumerate(f):
                if i >= 60: break
                texts.append(json.loads(line)['text'])
    tok_dir = work/'tokenizer'
    train_tokenizer(texts, min(1024, c.mc.vocab_size), tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg.data.tokenizer = str(tok_dir)
    return P.PretrainStage(cfg, tok), tok

def sec_trainer(c:Check)->dict:
    "The whole Trainer (data, logging, checkpoints) against the bare step on the batch the Trainer trained on."
    from smollm_kit.config import load_config
    from smollm_kit.trainer import Trainer
    from smollm_kit.optim import build_optimizer
    work = Path(tempfile.mkdtemp(prefix='gpu_check_trainer_'))
    rec, key = {}, target_kw()
    n_steps = 8 if c.a.dry_run else 10 if c.a.quick else 14
    ov = {'run.run_dir': str(work/'run'), 'run.name': 'gpu-check', 'train.max_steps': n_steps, 'train.micro_batch_size': c.mb,
          'train.grad_accum_steps': 1, 'train.seq_len': c.T, 'train.eval_every': 1000, 'train.eval_batches': 1,
          'train.compile': False, 'train.activation_checkpointing': False, 'data.val_docs': 8,
          'data.num_workers': 1 if c.a.dry_run else 2, 'checkpoint.every_steps': 100000, 'checkpoint.every_minutes': 100000,
          'checkpoint.keep_last': 1, 'logging.every_steps': 1, 'logging.progress': False, 'logging.wandb': False}
    if not c.a.dry_run: ov['model.preset'] = c.mc.preset
    cfg = load_config('tiny', ov)
    model = build_kit(cfg.model, c.dev)
    if c.a.data == 'synthetic' or (c.a.data == 'auto' and importlib.util.find_spec('datasets') is None):
        why = 'asked (--data synthetic)' if c.a.data == 'synthetic' else 'the datasets package is not installed (the demo corpus reader needs it)'
        rec['data'] = f'synthetic random packed batches: {why}'
        stage, tok = _synthetic_stage(c.mb, c.T, cfg.model.vocab_size, key), None
    else:
        stage, tok = _demo_stage(c, cfg, model, work); rec['data'] = 'demo corpus (PretrainData)'
    captured = []
    inner = stage.next_batch
    def next_batch(*a):
        b = inner(*a)
        if not captured: captured.append({k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()})
        return b
    stage.next_batch = next_batch
    times = []
    def cb(r):
        if 'train/loss' in r and 'step' in r: times.append((time.perf_counter(), r['step'], r['tokens']))
    tr = Trainer(cfg, model, stage, tokenizer=tok, callbacks=[cb])
    t = time.perf_counter(); res = tr.fit(); rec['fit_s'] = time.perf_counter() - t
    with contextlib.suppress(Exception): tr.ckpt.wait()
    rec['precision'] = getattr(tr, 'precision', None)
    recs = [json.loads(l) for l in open(work/'run'/'metrics.jsonl')]
    stalls = [r['stall_s'] for r in recs if r.get('event') == 'checkpoint' and 'stall_s' in r]
    rec['checkpoint_stall_s'] = stalls[-1] if stalls else None
    w = min(3, len(times) - 3)
    if len(times) < 5: raise RuntimeError(f"only {len(times)} step records reached the callback")
    (t0, s0, k0), (t1, s1, k1) = times[w], times[-2]  # skip warm-up steps and the last (it also evaluates)
    rec['trainer_tokens_per_sec'] = (k1 - k0) / (t1 - t0)
    rec['trainer_steps_timed'] = s1 - s0
    losses = [r['train/loss'] for r in recs if 'train/loss' in r]
    rec['loss_first_last'] = [losses[0], losses[-1]]
    # the bare step: the same model, a fresh optimizer, the first batch the Trainer trained on, the same autocast
    b = {k: v.to(c.dev) if torch.is_tensor(v) else v for k, v in captured[0].items()}
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(rec['precision'])
    tmodel = tr.model
    with contextlib.suppress(Exception): tr.ckpt.close()
    del tr, res; free()
    opt = build_optimizer(tmodel, cfg.optim)
    dt, _, _ = timed_steps(train_step(tmodel, opt, (b['input_ids'], b.get('doc_ids'), b[key]), c.dev, amp), c.warm, max(c.steps, 4))
    rec['bare_tokens_per_sec'] = b['input_ids'].numel() / dt
    rec['overhead_pct'] = 100 * (1 - rec['trainer_tokens_per_sec'] / rec['bare_tokens_per_sec'])
    rec['trainer_mfu'] = c.mfu(rec['trainer_tokens_per_sec']) if not c.a.dry_run else None
    del opt, tmodel; free()
    shutil.rmtree(work, ignore_errors=True)
    return rec

def sec_checkpoint(c:Check)->dict:
    "The stall of an async save of the 600M training state (fp32 weights + Muon/AdamW state after a step)."
    from smollm_kit.config import load_config
    from smollm_kit.optim import build_optimizer
    from smollm_kit.checkpoint import CheckpointManager
    model = build_kit(c.mc, c.dev); opt = build_optimizer(model, load_config('tiny').optim)
    train_step(model, opt, make_batch(1, min(c.T, 256), c.mc.vocab_size, c.dev), c.dev, c.amp)()  # optimizer state exists
    root = Path(tempfile.mkdtemp(prefix='gpu_check_ckpt_'))
    mgr = CheckpointManager(root, {'keep_last': 1})
    stalls, rec = [], {}
    try:
        for s in (1, 2):
            sync(); t = time.perf_counter()
            mgr.save(s, model.state_dict(), {'step': s, 'optim': opt.state_dict()})
            stalls.append(time.perf_counter() - t)
            mgr.wait()
        ev = [e for e in mgr.pop_events() if e.get('event') == 'checkpoint_written']
        rec = dict(stall_s_first=stalls[0], stall_s_later=stalls[1], write_s=ev[-1]['write_s'] if ev else None,
                   gb=ev[-1]['bytes'] / 1e9 if ev else None, note='first save allocates the pinned host buffers')
    finally:
        mgr.close(); shutil.rmtree(root, ignore_errors=True)
    return rec

def sec_generate(c:Check)->dict:
    "Rollouts: RLVR's `sample_rollouts` and chat's `generate_ids` (KV cache, batched, sampling) against transformers `generate`, bf16, no EOS."
    from smollm_kit.generate import generate_ids
    from smollm_kit.rlvr import sample_rollouts
    B, P, N = (4, 8, 8) if c.a.dry_run else (32, 128, 128) if c.a.quick else (64, 128, 256)
    kit = build_kit(c.mc, c.dev)
    dtype = torch.bfloat16 if c.cuda else torch.float32
    hf = _hf_model(c, kit, dtype).eval()
    kit = kit.to(dtype).eval()
    prompts = torch.randint(0, c.mc.vocab_size, (B, P), generator=torch.Generator().manual_seed(0))
    def kit_run(n):
        out = generate_ids(kit, prompts.tolist(), max_new_tokens=n, temperature=1.0, top_p=None, eos_id=None, seed=0)
        return sum(len(o) for o in out)
    def rollout_run(n):                       # the RLVR engine: stop checks on the device, one host sync per 16 tokens
        r = sample_rollouts(kit, prompts.tolist(), 1, max_new_tokens=n, temperature=1.0, generator=torch.Generator(c.dev).manual_seed(0))
        return int(r.lengths.sum())
    x = prompts.to(c.dev); mask = torch.ones_like(x)
    hf.generation_config.eos_token_id = None; hf.generation_config.pad_token_id = 0
    def hf_run(n):
        with torch.inference_mode():
            o = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                            temperature=1.0, top_k=0, top_p=1.0)
        return (o.shape[1] - P) * B
    rec = dict(batch=B, prompt=P, new_tokens=N)
    for name, fn in (('rollout', rollout_run), ('kit', kit_run), ('hf', hf_run)):
        fn(4); sync()
        t = time.perf_counter(); n = fn(N); sync(); dt = time.perf_counter() - t
        rec[f'{name}_tokens_per_sec'], rec[f'{name}_generated'] = n / dt, n
    rec['ratio'] = rec['kit_tokens_per_sec'] / rec['hf_tokens_per_sec']
    rec['rollout_ratio'] = rec['rollout_tokens_per_sec'] / rec['hf_tokens_per_sec']
    return rec

def sec_memory(c:Check)->dict:
    "Peak memory of the second training step at the reference micro-batch, with and without activation checkpointing."
    from smollm_kit.config import load_config
    from smollm_kit.optim import build_optimizer
    rec = {'micro_batch': c.ref_mb}
    for ac in (True, False):
        k = 'peak_gib_ac' if ac else 'peak_gib_no_ac'
        mb, tried = c.ref_mb, []
        while mb >= 1:
            oom = False
            try:
                model = build_kit(c.mc, c.dev).set_activation_checkpointing(ac)
                opt = build_optimizer(model, load_config('tiny').optim)
                step = train_step(model, opt, make_batch(mb, c.T, c.mc.vocab_size, c.dev, packed=True), c.dev, c.amp)
                step(); sync()
                if c.cuda: torch.cuda.reset_peak_memory_stats()
                step(); sync()
                rec[k] = torch.cuda.max_memory_allocated() / 2**30 if c.cuda else None
                if mb != c.ref_mb: rec[k + '_at_micro_batch'] = mb
                break
            except BaseException as e:
                if not is_oom(e): raise
                oom = True
            finally:
                model = opt = step = None
            if oom:
                free(); tried.append(mb); rec[k] = f'OOM at micro-batch {tried}'; mb = {48: 24, 24: 16}.get(mb, mb // 2)
        free()
    if not c.cuda: rec['status_override'] = 'skipped: no CUDA (both steps ran; peak memory needs torch.cuda)'
    return rec

def sec_precision_fp16(c:Check)->dict:
    "The T4 path: fp16 autocast + GradScaler (unscale, clip, step, update) with sdpa and a document mask."
    import dataclasses
    from smollm_kit.config import load_config
    from smollm_kit.optim import build_optimizer
    mc = dataclasses.replace(c.mc, attn_backend='sdpa')
    model = build_kit(mc, c.dev)
    opt = build_optimizer(model, load_config('tiny').optim)
    mb = max(1, c.mb // 2)
    batch = make_batch(mb, c.T, mc.vocab_size, c.dev, packed=True)
    with torch.no_grad():
        with autocast(c.dev, torch.bfloat16): lb = kit_loss(model, *batch).item()
        with autocast(c.dev, torch.float16): lh = kit_loss(model, *batch).item()
    scaler = torch.amp.GradScaler(c.dev.type)
    rec = dict(micro_batch=mb, loss_bf16=lb, loss_fp16=lh, loss_fp16_vs_bf16=abs(lb - lh))
    for name, amp, sc in (('bf16', torch.bfloat16, None), ('fp16', torch.float16, scaler)):
        step = train_step(model, opt, batch, c.dev, amp, scaler=sc, clip=1.0, params=list(model.parameters()))
        dt, _, loss = timed_steps(step, c.warm, c.steps)
        rec[f'{name}_tokens_per_sec' if name == 'bf16' else 'tokens_per_sec'] = mb * c.T / dt
        rec[f'loss_last_{name}'] = loss
    rec['scale'] = scaler.get_scale()
    rec['finite'] = math.isfinite(rec['loss_last_fp16'])
    if not rec['finite'] or rec['loss_fp16_vs_bf16'] > 0.05: rec['status_override'] = 'FAIL: fp16 loss not finite or far from bf16'
    if not c.cuda: rec['note'] = 'CPU fp16 autocast: the code path only'
    return rec

class _Audit:
    "A TorchDispatchMode recording the dtypes of every matmul / attention op (forward and backward)."
    MATMUL = {'mm', 'addmm', 'bmm', 'baddbmm', 'linear', 'matmul', '_scaled_mm', 'addmv', 'mv', 'dot'}
    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__(); self.phase, self.rows = 'forward', []
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                attn = any(s in name for s in ('attention', 'flash', 'efficient', 'cudnn_attn'))
                if name in cls.MATMUL or attn:
                    ts = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
                    if name in ('addmm', 'baddbmm'): ts = ts[1:3]
                    elif attn: ts = ts[:3]
                    self.rows.append((self.phase, name, tuple(str(t.dtype).replace('torch.', '') for t in ts)))
                return func(*args, **(kwargs or {}))
        return Mode()

def sec_dtype_audit(c:Check)->dict:
    "Every matmul and attention op of a bf16-autocast forward + backward (sdpa backend: flex is a compiled kernel)."
    import dataclasses
    mc = dataclasses.replace(c.mc, attn_backend='sdpa')
    model = build_kit(mc, c.dev)
    ids, docs, tgt = make_batch(2, min(c.T, 256), mc.vocab_size, c.dev, packed=True)
    mode = _Audit()
    with mode:
        with torch.autocast(c.dev.type, dtype=torch.bfloat16): loss = kit_loss(model, ids, docs, tgt)
        mode.phase = 'backward'
        loss.backward()
    cnt = collections.Counter(mode.rows)
    non = [dict(phase=p, op=n, dtypes=d, calls=k) for (p, n, d), k in cnt.items() if any(x != 'bfloat16' for x in d)]
    rec = dict(ops_forward=sum(k for (p, _, _), k in cnt.items() if p == 'forward'),
               ops_backward=sum(k for (p, _, _), k in cnt.items() if p == 'backward'),
               kinds=sorted({f'{p}:{n}' for p, n, _ in cnt}), non_bf16_count=sum(x['calls'] for x in non), non_bf16=non)
    if rec['ops_backward'] == 0: rec['warning'] = 'no backward op seen (dispatch mode not propagated to the autograd thread?)'
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=os.environ.get('OUT', '.'), help='directory for gpu_check.json')
    ap.add_argument('--quick', action='store_true', help='~3 minutes: fewer steps, smaller batch, no whole-model compile')
    ap.add_argument('--dry-run', action='store_true', help='the whole flow on CPU with a tiny model (for CI)')
    ap.add_argument('--only', default=None, help=f"comma-separated sections ({', '.join(SECTIONS)})")
    ap.add_argument('--budget', type=float, default=None, help='total seconds for the sections (default 450; 180 with --quick)')
    ap.add_argument('--micro-batch', type=int, default=None, help='training micro-batch (default 16 on >=120 GB, else 8)')
    ap.add_argument('--data', choices=['auto', 'demo', 'synthetic'], default='auto',
                    help="trainer section data: demo corpus if `datasets` imports (auto), or random packed batches")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; this script is for a GPU machine (use --dry-run to check the flow on CPU)"); return 2
    if a.dry_run: torch.set_num_threads(min(2, torch.get_num_threads()))
    only = [s.strip() for s in a.only.split(',')] if a.only else SECTIONS
    if (bad := [s for s in only if s not in SECTIONS]): ap.error(f"--only: unknown section(s) {bad}; choose from {SECTIONS}")
    c = Check(a)
    print(f"gpu_check {c.mode}: {c.gpu['name']}, model {c.mc.preset}, micro-batch {c.mb} x {c.T}, budget {c.budget:.0f} s "
          f"-> {c.out/'gpu_check.json'}", flush=True)
    plan = {'env': (sec_env, 30), 'attention': (sec_attention, 90), 'train_eager': (sec_train_eager, 60),
            'train_hf': (sec_train_hf, 75), 'train_blocks': (lambda c: sec_train_compiled(c, 'blocks'), 150),
            'profile': (sec_profile, 60), 'trainer': (sec_trainer, 120), 'checkpoint': (sec_checkpoint, 90),
            'generate': (sec_generate, 90), 'memory': (sec_memory, 60), 'precision_fp16': (sec_precision_fp16, 45),
            'dtype_audit': (sec_dtype_audit, 45), 'train_whole': (lambda c: sec_train_compiled(c, 'whole'), 180)}
    for name in SECTIONS:
        if name in only: c.run(name, lambda f=plan[name][0]: f(c), plan[name][1])
    c.write()
    print('\n' + c.table(), flush=True)
    (c.out/'gpu_check.md').write_text(c.table() + '\n')
    failed = [n for n, r in c.res['sections'].items() if not (r['status'] == 'ok' or r['status'].startswith('skipped'))]
    if failed: print(f"\ngpu_check: sections that did not complete: {', '.join(failed)} (details in gpu_check.json)", flush=True)
    return 1 if failed else 0

if __name__ == '__main__': sys.exit(main())
