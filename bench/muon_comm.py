"""Muon across ranks on CPU: step time and traffic of the Muon layouts, gradient synchronisation included.

    OMP_NUM_THREADS=1 python bench/muon_comm.py [--preset smollm-135m] [--layers 4] [--steps 5]

Runs 1 rank in this process, then 2 ranks under torchrun (gloo), and prints one table (ratios against 1 rank).
Matrices are the block matrices of `--layers` blocks of the preset, with a random gradient per rank. Each timed step
starts from every rank's own (unsynchronised) gradient, as after a backward, and includes what the layout does to
synchronise it, so the layouts compare fairly:

- `all-reduce, every rank NS`: DDP's all-reduce, then `torch.optim.Muon` orthogonalises every matrix on every rank;
- `all-reduce, NS 1/N, all_gather`: DDP's all-reduce, then `DistMuon` (each matrix on one rank, updates all-gathered);
- `reduce-scatter, NS 1/N, all_gather`: `DistMuon.reduce_grads` (each rank gets its own matrices' mean gradient), then
  `DistMuon` on those;
- `FSDP2 shards, all_to_all x2`: FSDP2's gradient reduce-scatter into row shards, then `DistMuon`'s two all_to_alls.

The bytes of DDP's all-reduce (a ring sends 2·(N−1)/N of the tensor per rank) and of FSDP2's reduce-scatter
((N−1)/N) are counted from those formulas; DistMuon counts its own exchanges."""
import argparse, json, os, subprocess, sys, tempfile, time
import torch, torch.nn as nn

LAYOUTS = {'replicated': 'all-reduce, every rank NS', 'all_reduce': 'all-reduce, NS 1/N, all_gather',
           'reduce_scatter': 'reduce-scatter, NS 1/N, all_gather', 'fsdp': 'FSDP2 shards, all_to_all x2'}

def matrices(preset, layers):
    from smollm_kit.config import ModelConfig, MODEL_PRESETS
    from smollm_kit.model import SmolLM
    from smollm_kit.optim import group_of
    cfg = ModelConfig(**{**MODEL_PRESETS[preset], 'n_layers': layers})
    m = SmolLM(cfg)
    return [tuple(p.shape) for n, p in m.named_parameters() if group_of(n, p) == 'muon']

def nbytes(t): return t.numel() * t.element_size()

def setup(mode, shapes, rank, ws):
    "(params, optimizer, sync): `sync(grads)` puts this rank's gradients where the layout wants them; returns bytes sent."
    import torch.distributed as dist
    from smollm_kit.optim import Muon
    from smollm_kit.distributed import DistMuon
    torch.manual_seed(0)
    full = [torch.randn(s) for s in shapes]
    kw = dict(lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn='original')
    if mode == 'fsdp':
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_tensor, DTensor, Shard
        mesh = init_device_mesh('cpu', (ws,))
        params = [nn.Parameter(distribute_tensor(w, mesh, [Shard(0)], src_data_rank=None)) for w in full]
        def sync(grads):                                   # FSDP2's reduce-scatter of the gradients into row shards
            for p, g in zip(params, grads):
                mine = torch.empty(g.shape[0] // ws, g.shape[1])
                dist.reduce_scatter_tensor(mine, g)
                p.grad = DTensor.from_local(mine / ws, mesh, [Shard(0)])
            return sum((ws - 1) / ws * nbytes(g) for g in grads)
        return params, DistMuon(params, **kw), sync
    params = [nn.Parameter(w.clone()) for w in full]
    opt = (Muon if mode == 'replicated' else DistMuon)(params, **kw)
    def sync(grads):
        for p, g in zip(params, grads): p.grad = g
        if ws == 1: return 0
        if mode == 'reduce_scatter': opt.reduce_grads(); return 0      # counted by DistMuon
        for g in grads: dist.all_reduce(g); g.div_(ws)                   # DDP's all-reduce (mean)
        return sum(2 * (ws - 1) / ws * nbytes(g) for g in grads)
    if mode == 'reduce_scatter': opt.reduce_scatter = True
    return params, opt, sync

def measure(mode, shapes, steps):
    import torch.distributed as dist
    from smollm_kit.distributed import world
    rank, ws = world()
    params, opt, sync = setup(mode, shapes, rank, ws)
    gen = torch.Generator().manual_seed(rank)
    t, sent = 0.0, 0.0
    for k in range(steps + 1):                                        # step 0: warm-up (buffers)
        grads = [torch.randn(s, generator=gen) for s in shapes]
        if ws > 1: dist.barrier()
        before = getattr(opt, 'comm_bytes', 0)
        t0 = time.perf_counter()
        b = sync(grads); opt.step()
        if ws > 1: dist.barrier()
        if k: t += time.perf_counter() - t0; sent += b + getattr(opt, 'comm_bytes', 0) - before
    return t / steps, sent / steps

def child(args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    shapes = matrices(args.preset, args.layers)
    out = {m: measure(m, shapes, args.steps) for m in LAYOUTS}
    if dist.get_rank() == 0: open(args.out, 'w').write(json.dumps(out))
    dist.destroy_process_group()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default='smollm-135m'); ap.add_argument('--layers', type=int, default=4)
    ap.add_argument('--steps', type=int, default=5); ap.add_argument('--child', action='store_true'); ap.add_argument('--out')
    args = ap.parse_args()
    if args.child: return child(args)
    torch.set_num_threads(1)
    shapes = matrices(args.preset, args.layers)
    n_params = sum(a * b for a, b in shapes)
    one, _ = measure('replicated', shapes, args.steps)
    out = tempfile.mktemp(suffix='.json')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29531', __file__, '--child',
           '--preset', args.preset, '--layers', str(args.layers), '--steps', str(args.steps), '--out', out]
    subprocess.run(cmd, check=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    two = json.loads(open(out).read())
    print(f"{args.preset}, {args.layers} blocks: {len(shapes)} Muon matrices, {n_params/1e6:.2f}M parameters (fp32), {args.steps} steps, CPU, 1 thread/rank")
    print(f"{'layout (gradient sync included)':<40}{'ranks':>6}{'step ms':>9}{'x 1 rank':>9}{'sent MB/rank':>14}{'x params':>10}")
    rows = [('one process, Muon', 1, one, 0.0)] + [(LAYOUTS[m], 2, *two[m]) for m in LAYOUTS]
    for name, r, t, b in rows:
        print(f"{name:<40}{r:>6}{t*1e3:>9.1f}{t/one:>9.2f}{b/1e6:>14.2f}{b/(n_params*4):>10.2f}")

if __name__ == '__main__': main()
