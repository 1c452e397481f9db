"""Muon across ranks on CPU: step time and communication of DistMuon vs every rank orthogonalising every matrix.

    OMP_NUM_THREADS=1 python bench/muon_comm.py [--preset smollm-135m] [--layers 4] [--steps 5]

Runs 1 rank in this process, then 2 ranks under torchrun (gloo), and prints one table (ratios against 1 rank).
Matrices are the block matrices of `--layers` blocks of the preset, with random gradients (DDP: the same on both ranks,
as after the all-reduce; FSDP2: each rank holds its row shard)."""
import argparse, json, os, subprocess, sys, tempfile, time
import torch, torch.nn as nn

def matrices(preset, layers):
    from smollm_kit.config import ModelConfig, MODEL_PRESETS
    from smollm_kit.model import SmolLM
    from smollm_kit.optim import group_of
    cfg = ModelConfig(**{**MODEL_PRESETS[preset], 'n_layers': layers})
    m = SmolLM(cfg)
    return [tuple(p.shape) for n, p in m.named_parameters() if group_of(n, p) == 'muon']

def measure(mode, shapes, steps):
    import torch.distributed as dist
    from smollm_kit.optim import Muon
    from smollm_kit.distributed import DistMuon, world, shard_rows
    rank, ws = world()
    torch.manual_seed(0)
    full = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    if mode == 'fsdp':
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_tensor, Shard
        mesh = init_device_mesh('cpu', (ws,))
        params = [nn.Parameter(distribute_tensor(w, mesh, [Shard(0)], src_data_rank=None)) for w in full]
        for p, g in zip(params, grads): p.grad = distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None)
    else:
        params = [nn.Parameter(w.clone()) for w in full]
        for p, g in zip(params, grads): p.grad = g.clone()
    cls = Muon if mode == 'replicated' else DistMuon
    opt = cls(params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn='original')
    opt.step()                                             # warm-up (buffers)
    if ws > 1: dist.barrier()
    DistMuon.comm_bytes = 0; opt.comm_bytes = 0
    t0 = time.perf_counter()
    for _ in range(steps): opt.step()
    if ws > 1: dist.barrier()
    return (time.perf_counter() - t0) / steps, getattr(opt, 'comm_bytes', 0) / steps

def child(args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    shapes = matrices(args.preset, args.layers)
    out = {m: measure(m, shapes, args.steps) for m in ('replicated', 'ddp', 'fsdp')}
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
    print(f"{'layout':<46}{'ranks':>6}{'step ms':>9}{'x 1 rank':>9}{'sent MB/rank':>14}{'x params':>10}")
    rows = [('every rank orthogonalises every matrix', 1, one, 0.0), ('every rank orthogonalises every matrix (DDP)', 2, *two['replicated']),
            ('DistMuon, DDP (NS 1/N, all_gather)', 2, *two['ddp']), ('DistMuon, FSDP2 shards (all_to_all x2)', 2, *two['fsdp'])]
    for name, r, t, b in rows:
        print(f"{name:<46}{r:>6}{t*1e3:>9.1f}{t/one:>9.2f}{b/1e6:>14.2f}{b/(n_params*4):>10.2f}")

if __name__ == '__main__': main()
