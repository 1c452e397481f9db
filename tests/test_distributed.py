"Two gloo processes on CPU under torchrun: DDP = grad accumulation, FSDP2 = DDP, one decision for all ranks, exact resume after SIGKILL, DistMuon = Muon."
import json, os, random, shutil, signal, socket, subprocess, sys, time
from pathlib import Path
import pytest, torch

pytestmark = pytest.mark.filterwarnings('ignore:.*no tokenizer files')
from smollm_kit.config import load_config, ConfigError
from smollm_kit.model import SmolLM
from smollm_kit.trainer import Stage, Trainer, lm_loss

STEPS = 10

class Toy(Stage):
    "Counting rows whose content is a pure function of (step, global micro-batch index); uneven target counts per micro-batch."
    name = 'toy'
    def __init__(self, rank=0, world_size=1, accum=1, draw=False, nan_at=None, sleep=0.0):
        self.rank, self.accum, self.draw, self.nan_at, self.sleep, self.k = rank, accum, draw, nan_at, sleep, 0
    def next_batch(self, ctx):
        step, i = divmod(self.k, self.accum); self.k += 1
        g = self.rank * self.accum + i                       # the micro-batch's index within the global step
        gen = torch.Generator().manual_seed(1000 * step + g)
        ids = (torch.randint(0, 64, (2, 1), generator=gen) + torch.arange(17)) % 64
        if self.draw: ids[:, 0] = torch.randint(0, 64, (2,))   # the global RNG: differs per rank, must resume per rank
        t = ids[:, 1:].clone(); t[0, 4 + (5 * g + step) % 10:] = -100
        if self.sleep: time.sleep(self.sleep)
        return {'input_ids': ids[:, :-1], 'targets': t, 'step': step}
    def loss(self, model, batch):
        s, n, m = lm_loss(model, batch)
        if self.nan_at == (batch['step'], self.rank): s = s * float('nan')
        return s, n, m
    def state_dict(self): return {'k': self.k, 'rank': self.rank}
    def load_state_dict(self, sd):
        assert sd['rank'] == self.rank, f"rank {self.rank} was given rank {sd['rank']}'s data position"
        self.k = sd['k']

def cfg_for(d, **kw):
    return load_config('tiny', {'run.run_dir': str(d), 'model.vocab_size': 64, 'model.n_layers': 2, 'train.max_steps': STEPS,
                                'train.micro_batch_size': 2, 'train.seq_len': 16, 'train.grad_accum_steps': 1, 'train.eval_every': 0,
                                'schedule.warmup_steps': 2, 'logging.every_steps': 1, 'logging.progress': False,
                                'checkpoint.every_steps': 5, 'checkpoint.every_minutes': None, **kw})

def losses(run_dir)->dict:
    "step -> train/loss (the last record per step: a resumed run rewrites the steps after its checkpoint)."
    out = {}
    for line in (Path(run_dir)/'metrics.jsonl').read_text().splitlines():
        r = json.loads(line)
        if 'train/loss' in r: out[r['step']] = r['train/loss']
    return out

def run(d, stage, **kw):
    torch.manual_seed(0)
    cfg = cfg_for(d, **kw)
    return Trainer(cfg, SmolLM(cfg.model), stage).fit()

def muon_layouts(rank, ws)->dict:
    "DistMuon's reduce-scatter layout and its all-reduce layout, 4 steps, against one-process Muon on the rank-averaged gradients."
    import torch.distributed as dist
    from smollm_kit.optim import Muon
    from smollm_kit.distributed import DistMuon
    if not dist.is_initialized(): dist.init_process_group('gloo')      # (the Trainer joins it otherwise)
    shapes = [(8, 4)] * 3 + [(4, 8)] * 2 + [(6, 6)]      # groups of 2, 1 (padded) and a lone matrix
    grad = lambda step, r, i: torch.randn(shapes[i], generator=torch.Generator().manual_seed(1000 * step + 100 * r + i))
    torch.manual_seed(0); w0 = [torch.randn(s) for s in shapes]
    def make(reduce_scatter=None):
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = (Muon if reduce_scatter is None else DistMuon)(ps, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn='original')
        if reduce_scatter: opt.reduce_scatter = True
        return ps, opt
    (ref_p, ref), (rs_p, rs), (ar_p, ar) = make(), make(True), make(False)
    def step(k, rs_p, rs):
        for i, p in enumerate(ref_p): p.grad = sum(grad(k, r, i) for r in range(ws)) / ws
        ref.step()
        for i, p in enumerate(rs_p): p.grad = grad(k, rank, i)          # each rank's own gradient: DistMuon averages
        rs.reduce_grads(); rs.step()
    close = lambda a, b: all(torch.allclose(x, y, atol=1e-6, rtol=0) for x, y in zip(a, b))
    for k in range(3):
        step(k, rs_p, rs)
        for i, p in enumerate(ar_p): p.grad = grad(k, rank, i); dist.all_reduce(p.grad); p.grad /= ws   # what DDP does
        ar.step()
    out = {'params': close(rs_p, ref_p) and close(ar_p, ref_p), 'buffers_here': len(rs.state)}
    sd, want = rs.state_dict(), ref.state_dict()                          # gathered from the owners
    out['state'] = close([sd['state'][i]['momentum_buffer'] for i in range(len(shapes))], [want['state'][i]['momentum_buffer'] for i in range(len(shapes))])
    rs2_p, rs2 = make(True)                                               # resume: a fresh optimizer loads the whole state
    for p, q in zip(rs2_p, rs_p): p.data.copy_(q.data)
    rs2.load_state_dict(sd)
    out['kept_after_load'] = len(rs2.state)
    step(3, rs2_p, rs2)
    out['resumed'] = close(rs2_p, ref_p)
    grad_bytes = sum(4 * a * b for a, b in shapes) * 3
    out['bytes'] = {'reduce_scatter': rs.comm_bytes, 'all_reduce': ar.comm_bytes + 2 * (ws - 1) / ws * grad_bytes}  # + ring all-reduce
    res = [None] * ws; dist.all_gather_object(res, out)
    return res

# -- the worker: `torchrun --nproc_per_node 2 tests/test_distributed.py <scenario> <dir>` ---------------------------
def worker(scenario, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    rank, ws = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    out = Path(out)
    def same_everywhere(model):
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        g = [torch.empty_like(flat) for _ in range(ws)]; dist.all_gather(g, flat)
        return all(torch.equal(g[0], x) for x in g[1:]) and bool(torch.isfinite(flat).all())
    res = {}
    if scenario == 'suite':
        res['muon'] = muon_layouts(rank, ws)                                     # (f)
        r = run(out/'ddp', Toy(rank, ws))                                         # (a)
        res['ddp_same'] = same_everywhere(r.model)
        run(out/'fsdp', Toy(rank, ws), **{'train.parallel': 'fsdp'})              # (b)
        if rank == 0:                                                            # (d) the other layout resumes each run
            for a, b in (('ddp', 'ddp2fsdp'), ('fsdp', 'fsdp2ddp')): shutil.copytree(out/a, out/b)
        dist.barrier()
        run(out/'ddp2fsdp', Toy(rank, ws), **{'train.parallel': 'fsdp', 'train.max_steps': STEPS + 2})
        run(out/'fsdp2ddp', Toy(rank, ws), **{'train.parallel': 'ddp', 'train.max_steps': STEPS + 2})
        r = run(out/'nan', Toy(rank, ws, nan_at=(3, 1)), **{'train.max_steps': 6})   # (e) a NaN on rank 1 only
        res['nan_same'] = same_everywhere(r.model)
        torch.manual_seed(0); lin = torch.nn.Linear(4, 4); w0 = lin.weight.detach().clone()   # GradScaler under DDP
        ddp, scaler = torch.nn.parallel.DistributedDataParallel(lin), torch.amp.GradScaler('cpu', init_scale=16.0)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        scaler.scale(ddp(torch.ones(2, 4)).sum() * (float('inf') if rank == 1 else 1.0)).backward()
        scaler.step(opt); scaler.update()
        scales = [None] * ws; dist.all_gather_object(scales, scaler.get_scale())
        res['scaler'] = {'scales': scales, 'unchanged': torch.equal(lin.weight.detach(), w0) and same_everywhere(lin)}
    if scenario in ('suite', 'kill'):                                            # (c)
        torch.manual_seed(0); cfg = cfg_for(out/scenario, **{'train.max_steps': 20, 'checkpoint.every_steps': 3})
        model = SmolLM(cfg.model); torch.manual_seed(100 + rank)
        Trainer(cfg, model, Toy(rank, ws, draw=True, sleep=0.03 if scenario == 'kill' else 0)).fit()
    if rank == 0: (out/f'{scenario}.json').write_text(json.dumps(res))
    dist.destroy_process_group()

def launch(scenario, out, timeout=120, **popen):
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', __file__, scenario, str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)

@pytest.fixture(scope='module')
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    p = launch('suite', out); log = p.communicate(timeout=240)[0]
    assert p.returncode == 0, log[-3000:]
    return out, json.loads((out/'suite.json').read_text())

def test_ddp_equals_grad_accumulation(suite, tmp_path):
    out, res = suite
    ref = run(tmp_path, Toy(accum=2), **{'train.grad_accum_steps': 2})    # one process, both micro-batches
    a, b = losses(out/'ddp'), losses(tmp_path)
    assert sorted(a) == list(range(1, STEPS + 1)) == sorted(b)
    for s in a: assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])
    from smollm_kit.export import load_model
    m, _ = load_model(out/'ddp')
    for (n, p), q in zip(m.state_dict().items(), ref.model.state_dict().values()): torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
    assert res['ddp_same']

def test_fsdp2_equals_ddp_and_loads_in_one_process(suite):
    out, _ = suite
    a, b = losses(out/'ddp'), losses(out/'fsdp')
    assert sorted(a) == sorted(b)
    for s in a: assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
    from smollm_kit.export import load_model
    fs, dd = load_model(out/'fsdp')[0].state_dict(), load_model(out/'ddp')[0].state_dict()   # gathered full state, no process group
    assert fs.keys() == dd.keys()
    for k in fs: torch.testing.assert_close(fs[k], dd[k], atol=1e-4, rtol=0)

def test_checkpoints_move_between_ddp_and_fsdp2(suite):
    out, _ = suite
    a, b = losses(out/'ddp2fsdp'), losses(out/'fsdp2ddp')      # DDP's checkpoint continued under FSDP2, and vice versa
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 3))
    for s in (STEPS + 1, STEPS + 2): assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
    for d in ('ddp2fsdp', 'fsdp2ddp'):
        assert any(json.loads(l).get('event') == 'resume' for l in (out/d/'metrics.jsonl').read_text().splitlines())

def test_nan_on_one_rank_skips_on_all(suite):
    out, res = suite
    recs = [json.loads(l) for l in (out/'nan'/'metrics.jsonl').read_text().splitlines()]
    assert any(r.get('event') == 'nan' and r.get('action') == 'skip' and r['step'] == 4 for r in recs)
    assert res['nan_same']          # both ranks skipped: the replicas still hold the same finite weights

def test_grad_scaler_agrees_under_ddp(suite):
    "An inf in one rank's loss reaches every rank's gradients through the all-reduce: every scaler skips and backs off."
    _, res = suite
    assert res['scaler']['scales'] == [8.0, 8.0] and res['scaler']['unchanged']

def test_dist_muon_reduce_scatter_equals_muon_and_sends_less(suite):
    "Reduce-scatter, Newton-Schulz on the owned matrices, all-gather = one-process Muon; each buffer on one rank, gathered for a checkpoint."
    _, res = suite
    for r in res['muon']:
        assert r['params'] and r['state'] and r['resumed'], r
        assert r['kept_after_load'] == r['buffers_here']                  # loading the whole state keeps only the owned buffers
        assert r['bytes']['reduce_scatter'] < r['bytes']['all_reduce'], r['bytes']
    assert sum(r['buffers_here'] for r in res['muon']) == 6               # every momentum buffer lives on exactly one rank

def test_sigkill_all_ranks_then_resume_is_bit_identical(suite):
    out, _ = suite
    p = launch('kill', out, start_new_session=True)
    ck = out/'kill'/'checkpoints'
    t0 = time.monotonic()
    while not (ck/'step_00000003').exists():
        assert p.poll() is None and time.monotonic() - t0 < 120, p.stdout.read()[-3000:] if p.poll() is not None else 'timeout'
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.3))
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (ck/'step_00000020').exists(), "the run finished before the kill: nothing was tested"
    p = launch('kill', out); log = p.communicate(timeout=180)[0]
    assert p.returncode == 0, log[-3000:]
    ref, got = losses(out/'suite'), losses(out/'kill')
    assert sorted(got) == sorted(ref) == list(range(1, 21))
    assert got == ref                # bit-identical floats, every step
    assert any(json.loads(l).get('event') == 'resume' for l in (out/'kill'/'metrics.jsonl').read_text().splitlines())

def test_other_world_size_is_refused(suite):
    out, _ = suite
    cfg = cfg_for(out/'suite', **{'train.max_steps': 20, 'checkpoint.every_steps': 3})
    with pytest.raises(ConfigError, match='written by 2 rank'):
        Trainer(cfg, SmolLM(cfg.model), Toy(draw=True)).fit()

if __name__ == '__main__': worker(sys.argv[1], sys.argv[2])
