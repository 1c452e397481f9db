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
    out['fsdp'] = fsdp_muon(rank, ws)
    res = [None] * ws; dist.all_gather_object(res, out)
    return res

def fsdp_muon(rank, ws)->bool:
    "DistMuon on FSDP2 row shards of uneven size (5 rows on 2 ranks), a padded group and a lone matrix = one-process Muon."
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard
    from smollm_kit.optim import Muon
    from smollm_kit.distributed import DistMuon
    mesh, shapes = init_device_mesh('cpu', (ws,)), [(5, 6)] * 3 + [(3, 4)]
    torch.manual_seed(1); w0 = [torch.randn(s) for s in shapes]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn='original')
    ref_p = [torch.nn.Parameter(w.clone()) for w in w0]; ref = Muon(ref_p, **kw)
    fs_p = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in w0]; fs = DistMuon(fs_p, **kw)
    for k in range(3):
        g = [torch.randn(s, generator=torch.Generator().manual_seed(10 * k + i)) for i, s in enumerate(shapes)]   # the averaged gradient
        for p, x in zip(ref_p, g): p.grad = x.clone()
        for p, x in zip(fs_p, g): p.grad = distribute_tensor(x.clone(), mesh, [Shard(0)])   # what FSDP2's reduce-scatter leaves
        ref.step(); fs.step()
    return all(torch.allclose(p.full_tensor(), q, atol=1e-6, rtol=0) for p, q in zip(fs_p, ref_p))

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
        run(out/'fsdp', Toy(rank, ws), **{'train.parallel': 'fsdp', 'checkpoint.mirror_dir': str(out/'fsdp_mirror'),   # (b)
                                          'checkpoint.keep_last': 1})
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
    for name in (['suite', 'suite_fsdp'] if scenario == 'suite' else [scenario] if scenario.startswith('kill') else []):   # (c)
        par = {'train.parallel': 'fsdp'} if name.endswith('fsdp') else {}
        torch.manual_seed(0); cfg = cfg_for(out/name, **{'train.max_steps': 20, 'checkpoint.every_steps': 3, **par})
        model = SmolLM(cfg.model); torch.manual_seed(100 + rank)
        Trainer(cfg, model, Toy(rank, ws, draw=True, sleep=0.03 if name.startswith('kill') else 0)).fit()
    if scenario == 'stages':                     # DPO and RLVR under DDP and FSDP2: precompute on rank 0, rollouts of any length
        from smollm_kit.sft import sft
        from smollm_kit.dpo import dpo
        from smollm_kit.rlvr import rlvr
        quiet = {'logging.progress': False, 'logging.every_steps': 1, 'train.max_steps': 2, 'train.eval_every': 1}
        for par in ('ddp', 'fsdp'):
            sft(load_config('sft-tiny', {'run.run_dir': str(out/f'sft_{par}'), 'sft.demo_examples': 200, 'sft.val_examples': 8,
                                         'sft.eval_generations': 8, 'sft.max_new_tokens': 8, 'train.grad_accum_steps': 1,
                                         'train.parallel': par, **quiet}))
            dpo(load_config('dpo-tiny', {'run.run_dir': str(out/f'dpo_{par}'), 'dpo.demo_pairs': 120, 'train.seq_len': 128,
                                         'train.parallel': par, **quiet}))
            rlvr(load_config('rlvr-tiny', {'run.run_dir': str(out/f'rlvr_{par}'), 'train.micro_batch_size': 4, 'train.grad_accum_steps': 1,
                                           'rlvr.num_generations': 4, 'rlvr.max_completion_length': 12, 'rlvr.val_examples': 4,
                                           'rlvr.verifier': 'test_rlvr:digit_share', 'optim.adamw_lr': 3e-3,   # a dense reward: gradients to compare
                                           'train.parallel': par, **quiet}))
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
    assert all(r['fsdp'] for r in res['muon'])                            # FSDP2 layout: uneven row shards, padded groups

@pytest.mark.parametrize('kill,ref', [('kill', 'suite'), ('kill_fsdp', 'suite_fsdp')])
def test_sigkill_all_ranks_then_resume_is_bit_identical(suite, kill, ref):
    "DDP (rank 0 writes one file) and FSDP2 (every rank writes its shards): kill -9 anywhere, rerun, same floats."
    out, _ = suite
    p = launch(kill, out, start_new_session=True)
    ck = out/kill/'checkpoints'
    t0 = time.monotonic()
    while not (ck/'step_00000003').exists():
        assert p.poll() is None and time.monotonic() - t0 < 120, p.stdout.read()[-3000:] if p.poll() is not None else 'timeout'
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.3))
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (ck/'step_00000020').exists(), "the run finished before the kill: nothing was tested"
    p = launch(kill, out); log = p.communicate(timeout=180)[0]
    assert p.returncode == 0, log[-3000:]
    ref, got = losses(out/ref), losses(out/kill)
    assert sorted(got) == sorted(ref) == list(range(1, 21))
    assert got == ref                # bit-identical floats, every step
    assert any(json.loads(l).get('event') == 'resume' for l in (out/kill/'metrics.jsonl').read_text().splitlines())

def test_fsdp2_writes_shards_that_reshard_to_one_process(suite):
    "Every rank wrote its own DCP file; mirror and rotation treat the checkpoint like any other; one process reads model and optimizer back whole."
    from smollm_kit.checkpoint import is_sharded, load_checkpoint, verify_checkpoint
    from smollm_kit.distributed import load_sharded_state
    from smollm_kit.optim import build_optimizer
    out, _ = suite
    steps = lambda d: sorted(p.name for p in (d/'checkpoints').glob('step_*'))
    assert steps(out/'fsdp') == steps(out/'fsdp_mirror') == [f'step_{STEPS:08d}']          # keep_last 1, here and on the mirror
    for ck in (out/'fsdp'/'checkpoints'/f'step_{STEPS:08d}', out/'fsdp_mirror'/'checkpoints'/f'step_{STEPS:08d}'):
        assert is_sharded(ck) and verify_checkpoint(ck) is None and not (ck/'model.safetensors').exists()
        assert sorted(p.name for p in (ck/'dcp').glob('*.distcp')) == ['__0_0.distcp', '__1_0.distcp']
    cfg = cfg_for(out/'unused'); m = SmolLM(cfg.model); opt = build_optimizer(m, cfg.optim)
    load_sharded_state(m, opt, out/'fsdp'/'checkpoints'/f'step_{STEPS:08d}')       # 2 ranks' pieces -> 1 process
    ref_model, ref_state, _ = load_checkpoint(out/'ddp'/'checkpoints'/f'step_{STEPS:08d}')   # DDP's whole state, same run
    for k, v in m.state_dict().items(): torch.testing.assert_close(v, ref_model[k], atol=1e-4, rtol=0)
    got, want = opt.state_dict(), ref_state['optim']
    n = 0
    for part in got:
        for i, st in got[part]['state'].items():
            for key, t in st.items(): torch.testing.assert_close(t, want[part]['state'][i][key], atol=1e-4, rtol=0); n += 1
    assert n == sum(len(s) for p in want.values() for s in p['state'].values()) > 0

def test_sft_dpo_rlvr_run_under_fsdp2_as_under_ddp(tmp_path):
    "SFT's generated replies, DPO's reference pass (rank 0 alone) and RLVR's rollouts (each rank its own length) use whole weights under FSDP2: no hang, same numbers."
    p = launch('stages', tmp_path); log = p.communicate(timeout=400)[0]
    assert p.returncode == 0, log[-3000:]
    def recs(d):
        out = {}
        for line in (tmp_path/d/'metrics.jsonl').read_text().splitlines():
            r = json.loads(line)
            if 'event' not in r: out.setdefault(r['step'], {}).update(r)
        return out
    for stage, keys in (('sft', ['train/loss', 'val/loss', 'val/exact_match']),
                        ('dpo', ['train/loss', 'train/rewards/margins', 'val/rewards/accuracies', 'val/rewards/margins']),
                        ('rlvr', ['train/loss', 'train/reward', 'train/completion_len', 'val/pass@1'])):
        d, f = recs(f'{stage}_ddp'), recs(f'{stage}_fsdp')
        assert sorted(d) == sorted(f) == [0, 1, 2], (stage, sorted(f))
        assert d[1]['train/grad_norm'] > 0.1, (stage, d[1])   # gradients to compare (RLVR: the dense digit reward)
        for k in keys + ['train/grad_norm']:  # step 1 starts from the same weights in both layouts: the same rollouts and losses
            if k in d[1]: assert abs(d[1][k] - f[1][k]) <= 1e-4 * max(1, abs(d[1][k])), (stage, k, d[1][k], f[1][k])
        assert all(k in f[2] for k in keys if k in d[2])
    assert (tmp_path/'dpo_fsdp'/'ref_logps').is_dir()

@pytest.mark.parametrize('name,par', [('suite', 'ddp'), ('suite_fsdp', 'fsdp')])
def test_other_world_size_is_refused(suite, name, par):
    "Weights would reshard, each rank's data stream would not: 1 process resuming a 2-rank run is refused, naming the way out."
    out, _ = suite
    cfg = cfg_for(out/name, **{'train.max_steps': 22, 'checkpoint.every_steps': 3, 'train.parallel': par})
    with pytest.raises(ConfigError, match='written by 2 rank.*--init-from'):
        Trainer(cfg, SmolLM(cfg.model), Toy(draw=True)).fit()
    cfg = cfg_for(out/name, **{'train.max_steps': 20, 'checkpoint.every_steps': 3, 'train.parallel': par})
    res = Trainer(cfg, SmolLM(cfg.model), Toy(draw=True)).fit()     # finished: "already complete", with its weights
    from smollm_kit.export import load_model
    assert res.step == 20 and res.resumed_from == 20
    for k, v in load_model(out/name)[0].state_dict().items(): assert torch.equal(v, res.model.state_dict()[k]), k

if __name__ == '__main__': worker(sys.argv[1], sys.argv[2])
