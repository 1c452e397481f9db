"""How long does the training loop stall per checkpoint save? Prints a markdown table.

    python bench/checkpoint_stall.py                 # 600M model state (bf16) and the full training state
    python bench/checkpoint_stall.py --only model    # just the model state
    python bench/checkpoint_stall.py --dir /content  # measure on another disk
    python bench/checkpoint_stall.py --only full --layers 8   # a third of the model, where RAM is short (scale by 3)

`stall` is the time `CheckpointManager.save()` blocks the caller (the loop); `write` is the background part
(serialise + fsync + sha256 + manifest + rename), measured by the manager itself. On a CPU-only machine the
snapshot is a host->host copy; on a GPU it is a device->host copy into pinned buffers.
"""
import argparse, hashlib, os, shutil, statistics, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from smollm_kit.checkpoint import CheckpointManager
from smollm_kit.config import ModelConfig, MODEL_PRESETS
from smollm_kit.model import SmolLM

def shapes_600m(n_layers=24):
    "Parameter shapes of the `smollm-600m` model (built on the meta device: no memory), in state_dict order, tied head left out."
    with torch.device('meta'): m = SmolLM(ModelConfig(**{**MODEL_PRESETS['smollm-600m'], 'n_layers': n_layers}))
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if k != 'lm_head.weight'}

def make_state(kind:str, device:str, n_layers:int=24):
    "`(model_state, state)`: 'model' = bf16 weights only; 'full' = fp32 weights + Muon momentum + AdamW moments."
    dt = torch.bfloat16 if kind == 'model' else torch.float32
    ms = {k: torch.empty(v, dtype=dt, device=device).uniform_() for k, v in shapes_600m(n_layers=n_layers).items()}
    ms['lm_head.weight'] = ms['embed_tokens.weight']  # tied
    state = {'step': 0}
    if kind == 'full':
        opt = {}
        for i, (k, t) in enumerate(ms.items()):
            if k == 'lm_head.weight': continue
            if t.ndim == 2 and k != 'embed_tokens.weight': opt[i] = {'momentum_buffer': torch.empty_like(t).uniform_()}
            else: opt[i] = {'step': torch.tensor(1.0), 'exp_avg': torch.empty_like(t).uniform_(), 'exp_avg_sq': torch.empty_like(t).uniform_()}
        state['optim'] = {'state': opt, 'param_groups': [{'lr': 0.02, 'params': list(opt)}]}
    return ms, state

def nbytes(x):
    if isinstance(x, torch.Tensor): return x.numel()*x.element_size()
    if isinstance(x, dict): return sum(nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)): return sum(nbytes(v) for v in x)
    return 0

def run(kind, async_save, repeats, root, device, n_layers):
    ms, state = make_state(kind, device, n_layers)
    gb = (nbytes({k: v for k, v in ms.items() if k != 'lm_head.weight'}) + nbytes(state))/1e9
    d = Path(tempfile.mkdtemp(dir=root))
    mgr = CheckpointManager(d, {'keep_last': 1}, async_save=async_save)
    stalls = []
    for s in range(1, repeats+1):
        state['step'] = s
        t = time.perf_counter(); mgr.save(s, ms, state); stalls.append(time.perf_counter() - t)
        mgr.wait()
    ev = [e for e in mgr.pop_events() if e['event'] == 'checkpoint_written']
    mgr.close(); shutil.rmtree(d)
    later, write = sorted(stalls[1:]), min(e['write_s'] for e in ev[1:])
    return gb, stalls[0], later[0], statistics.median(later), write, ev[-1]['bytes']/1e6/(later[0] if not async_save else write)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dir', default=None, help='where to write (default: the temp dir)')
    ap.add_argument('--only', choices=['model', 'full'], default=None)
    ap.add_argument('--repeats', type=int, default=4, help='saves per row (the first pays buffer allocation)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--layers', type=int, default=24, help='transformer blocks (24 = the 600M recipe)')
    ap.add_argument('--modes', default='async,sync', help='which of async,sync to measure')
    ap.add_argument('--threads', type=int, default=None, help='torch intra-op threads (host->host copies use them)')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    x = os.urandom(256 << 20)
    rates = {}
    for algo in ('sha256', 'blake2b', 'md5'):
        t = time.perf_counter(); hashlib.new(algo, x).hexdigest(); rates[algo] = len(x)/(time.perf_counter()-t)/1e6
    print(f"device: {a.device}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}; "
          "hash MB/s: " + ', '.join(f"{k} {v:.0f}" for k, v in rates.items()))
    print('| state | size GB | mode | stall, 1st save (s) | stall, later saves: min / median (s) | background write, min (s) | write MB/s |')
    print('|---|---|---|---|---|---|---|')
    for kind in ([a.only] if a.only else ['model', 'full']):
        for async_save in [m == 'async' for m in a.modes.split(',')]:
            gb, first, best, median, write, mbs = run(kind, async_save, a.repeats, a.dir, a.device, a.layers)
            mode = 'async (default)' if async_save else 'sync'
            name = '600M model, bf16' if kind == 'model' else '600M full training state (fp32 + optimizer)'
            if a.layers != 24: name += f', {a.layers} of 24 layers'
            print(f"| {name} | {gb:.2f} | {mode} | "
                  f"{first:.2f} | {best:.2f} / {median:.2f} | {f'{write:.2f}' if async_save else '(in the stall)'} | {mbs:.0f} |", flush=True)

if __name__ == '__main__': main()
