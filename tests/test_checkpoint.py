"Checkpoint manager: bitwise round trips, corruption, rotation, mirror failures, kills mid-write, resume compatibility."
import os, pathlib, random, shutil, signal, subprocess, sys, textwrap, threading, time, warnings
from collections import OrderedDict
from pathlib import Path
import numpy as np, pytest, torch
from safetensors import safe_open
from smollm_kit.checkpoint import (CheckpointManager, CheckpointError, GracefulInterrupt, capture_rng, restore_rng,
                                   check_resume_compat, rotation_plan, write_manifest, verify_checkpoint, load_checkpoint)
from smollm_kit.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

def same(a, b):
    "Bitwise equality of nested state: tensors byte for byte (dtype, shape, NaN payloads included), containers by type."
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and
                torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))
    if isinstance(a, dict): return type(a) == type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return type(a) == type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and a != a: return isinstance(b, float) and b != b
    return type(a) == type(b) and a == b

class Toy(torch.nn.Module):
    "A tiny LM with the shared-interface names and a tied output projection."
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = torch.nn.Embedding(64, 16)
        self.norm = torch.nn.RMSNorm(16)
        self.lm_head = torch.nn.Linear(16, 64, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer('counts', torch.arange(5))
        self.register_buffer('mask', torch.tensor([True, False]))
        self.register_buffer('none_yet', torch.zeros(0, 4))
        self.register_buffer('scale', torch.tensor(0.5, dtype=torch.bfloat16))
    def forward(self, x): return self.lm_head(self.norm(self.embed_tokens(x)))

def trained_toy():
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(2):
        m(torch.arange(10)).logsumexp(-1).mean().backward(); opt.step(); opt.zero_grad()
    return m, opt

def rich_state(opt):
    return {'optim': [opt.state_dict()], 'rng': capture_rng(),
            'counters': {'step': 7, 'tokens': 7 * 4096, 'elapsed_s': 12.5, 'usd': 0.0031},
            'data': {'positions': [3, 1, 4], 'domain': 'web', 'seen': (1, 2), 'none': None, 'blob': b'\x00\x01',
                     'od': OrderedDict(b=1, a=2), 'ids': torch.tensor([1, 2, 3])},
            'misc': {'nan': float('nan'), 'inf': float('inf'), 'dtype': torch.bfloat16, 'flag': True,
                     'bf16': torch.tensor([1.5, -0.0, float('nan')], dtype=torch.bfloat16),
                     'bool': torch.tensor([True, False]), 'empty': torch.zeros(0, 3), 'scalar': torch.tensor(2.5),
                     'strided': torch.arange(12.).reshape(3, 4).t()}}

def mgr_for(tmp, async_save=False, **cfg):
    return CheckpointManager(tmp/'run', {'keep_last': 3, **cfg}, async_save=async_save, mirror_backoff_s=0.01)

def step_dirs(root): return sorted(p.name for p in Path(root).glob('step_*'))

# --- round trips -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('async_save', [False, True])
def test_roundtrip_bitwise(tmp_path, async_save):
    m, opt = trained_toy()
    state = rich_state(opt)
    draws = (random.random(), np.random.rand(), torch.rand(2))
    mgr = mgr_for(tmp_path, async_save)
    p = mgr.save(7, m.state_dict(), state, config_yaml='model: {d_model: 16}\n')
    mgr.wait()
    # the tied weight is stored once, under the first name
    with safe_open(str(p/'model.safetensors'), 'pt') as f: keys = set(f.keys())
    assert keys == {'embed_tokens.weight', 'norm.weight', 'counts', 'mask', 'none_yet', 'scale'}
    ms, st, cy = CheckpointManager(tmp_path/'run', {}).load(mgr.latest_valid())
    assert list(ms) == list(m.state_dict()) and same(ms, dict(m.state_dict()))
    assert ms['lm_head.weight'] is ms['embed_tokens.weight']
    assert same(st, state) and cy == 'model: {d_model: 16}\n'
    assert same(load_checkpoint(p), (ms, st, cy))                  # the manager-free reader gives the same
    m2 = Toy(seed=1); m2.load_state_dict(ms)
    assert m2.lm_head.weight is m2.embed_tokens.weight and same(m2.state_dict(), m.state_dict())
    restore_rng(st['rng'])
    assert same((random.random(), np.random.rand(), torch.rand(2)), draws)

def test_resume_continues_exactly(tmp_path):
    "Resuming from a checkpoint continues exactly as if never stopped (weights, AdamW moments, RNG)."
    m, opt = trained_toy()
    mgr = mgr_for(tmp_path)
    mgr.save(2, m.state_dict(), {'optim': opt.state_dict(), 'rng': capture_rng()})
    def more(model, o):
        x = torch.randint(0, 64, (10,))
        model(x).logsumexp(-1).mean().backward(); o.step(); o.zero_grad()
        return model.state_dict()
    ref = {k: v.clone() for k, v in more(m, opt).items()}
    ms, st, _ = mgr.load(mgr.latest_valid())
    m2 = Toy(seed=5); m2.load_state_dict(ms)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2); o2.load_state_dict(st['optim'])
    restore_rng(st['rng'])
    assert same(dict(more(m2, o2)), ref)

def test_async_save_snapshot_is_isolated_from_training(tmp_path):
    w = torch.zeros(1 << 20)
    mgr = mgr_for(tmp_path, async_save=True)
    mgr.save(1, {'w': w}, {'ema': w * 1})
    w.add_(1)                                  # the next training step mutates the parameters at once
    mgr.save(2, {'w': w}, {'ema': w * 1})      # and the reused buffers must not leak into step 1
    mgr.wait()
    ms1, st1, _ = mgr.load(tmp_path/'run/checkpoints/step_00000001')
    ms2, _, _ = mgr.load(tmp_path/'run/checkpoints/step_00000002')
    assert ms1['w'].sum() == 0 and st1['ema'].sum() == 0 and ms2['w'].min() == 1
    ev = mgr.pop_events()
    assert [e['event'] for e in ev] == ['checkpoint_written', 'checkpoint_written'] and all(e['stall_s'] >= 0 for e in ev)

def test_same_step_saved_twice_is_replaced(tmp_path):
    mgr = mgr_for(tmp_path)
    mgr.save(5, {'w': torch.zeros(3)}, {})
    mgr.save(5, {'w': torch.ones(3)}, {})
    assert step_dirs(mgr.dir) == ['step_00000005'] and not list(mgr.dir.glob('.tmp-*'))
    assert mgr.load(mgr.latest_valid())[0]['w'].sum() == 3

def test_tokenizer_is_saved_and_autotokenizer_loadable(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({'[UNK]': 0, 'hello': 1, 'world': 2}, unk_token='[UNK]'))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='[UNK]')
    mgr = mgr_for(tmp_path, mirror_dir=str(tmp_path/'drive'))
    p = mgr.save(1, {'w': torch.zeros(2)}, {}, tokenizer=hf)
    assert mgr.wait_for_mirror(timeout=30)
    for root in (p, tmp_path/'drive/checkpoints/step_00000001'):
        assert AutoTokenizer.from_pretrained(str(root/'tokenizer'))('hello world')['input_ids'] == [1, 2]
    src = tmp_path/'tok'; src.mkdir(); (src/'tokenizer.json').write_text('{}')
    p2 = mgr.save(2, {'w': torch.zeros(2)}, {}, tokenizer_dir=src)
    assert (p2/'tokenizer/tokenizer.json').read_text() == '{}'
    with pytest.raises(ValueError, match='not both'): mgr.save(3, {}, {}, tokenizer=hf, tokenizer_dir=src)
    mgr.close()

def test_save_refuses_state_that_would_not_load(tmp_path):
    mgr = mgr_for(tmp_path)
    with pytest.raises(ValueError, match=r"state\['data'\]\['perm'\]: numpy.ndarray"):
        mgr.save(1, {'w': torch.zeros(2)}, {'data': {'perm': np.arange(4)}})
    with pytest.raises(ValueError, match=r"state\['fn'\]: builtins.function"):
        mgr.save(1, {'w': torch.zeros(2)}, {'fn': lambda: 0})
    assert not mgr.dir.exists() or not list(mgr.dir.iterdir())

def test_weights_only_rejects_pickled_object(tmp_path):
    marker = tmp_path/'pwned'
    class Evil:
        def __reduce__(self): return (pathlib.Path.touch, (marker,))
    mgr = mgr_for(tmp_path)
    p = mgr.save(1, {'w': torch.zeros(2)}, {'ok': 1})
    torch.save({'x': Evil()}, p/'state.pt')
    write_manifest(p, 1)                                  # checksums match: only weights_only stands in the way
    with pytest.raises(CheckpointError, match='weights_only'): CheckpointManager(tmp_path/'run', {}).load(p)
    assert not marker.exists()
    torch.load(p/'state.pt', weights_only=False)          # the payload is real: an unsafe load runs it
    assert marker.exists()

# --- corruption --------------------------------------------------------------------------------------------------

def _truncate(p): f = p/'model.safetensors'; f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
def _flip(p):
    f = p/'state.pt'; b = bytearray(f.read_bytes()); b[len(b) // 2] ^= 0x01; f.write_bytes(bytes(b))
def _flip_weight(p):
    f = p/'model.safetensors'; b = bytearray(f.read_bytes()); b[-3] ^= 0x80; f.write_bytes(bytes(b))
def _no_manifest(p): (p/'manifest.json').unlink()
def _bad_manifest(p): (p/'manifest.json').write_text('{"format": "smollm_kit.checkpoint/1", "files": ')
def _missing_file(p): (p/'state.pt').unlink()
def _escaping_manifest(p):
    import json
    man = json.loads((p/'manifest.json').read_text())
    man['files']['../../outside.txt'] = {'size': 1, 'digest': '00'}
    (p/'manifest.json').write_text(json.dumps(man))
def _tmp_leftover(p):
    "A complete-looking copy left under a temp name by a dead process: never a checkpoint."
    shutil.copytree(p, p.parent/'.tmp-step_00000030-999999999-dead-otherhost')
    shutil.rmtree(p)   # and step 20 itself is gone too, so the fallback is step 10

CORRUPTIONS = {'truncated': (_truncate, 'model.safetensors has'), 'flipped byte': (_flip, 'state.pt fails its sha256'),
               'flipped weight': (_flip_weight, 'model.safetensors fails its sha256'),
               'missing manifest': (_no_manifest, 'no manifest.json'), 'bad manifest': (_bad_manifest, 'unreadable manifest'),
               'missing file': (_missing_file, 'state.pt is missing'),
               'manifest escaping its dir': (_escaping_manifest, "bad entry '../../outside.txt'"), 'tmp leftover': (_tmp_leftover, 'interrupted save')}

@pytest.mark.parametrize('kind', list(CORRUPTIONS))
def test_corrupted_checkpoint_is_skipped_with_reason(tmp_path, kind):
    corrupt, reason = CORRUPTIONS[kind]
    mgr = mgr_for(tmp_path)
    for s in (10, 20): mgr.save(s, {'w': torch.full((1000,), float(s))}, {'step': s})
    corrupt(mgr.dir/'step_00000020')
    fresh = mgr_for(tmp_path)
    with pytest.warns(UserWarning, match=reason): best = fresh.latest_valid()
    assert best == fresh.dir/'step_00000010'
    assert fresh.load(best)[1] == {'step': 10}
    if (mgr.dir/'step_00000020').exists():
        with pytest.raises(CheckpointError): fresh.load(mgr.dir/'step_00000020')
        assert [c['step'] for c in fresh.list(verify=True)] == [10]

def test_no_checkpoint_at_all(tmp_path):
    assert mgr_for(tmp_path).latest_valid() is None and mgr_for(tmp_path).list() == []

def test_leftover_tmp_dirs_of_dead_processes_are_removed_by_next_save(tmp_path):
    mgr = mgr_for(tmp_path)
    mgr.save(1, {'w': torch.zeros(2)}, {})
    dead = mgr.dir/'.tmp-step_00000002-999999999-dead-otherhost'; dead.mkdir(); (dead/'model.safetensors').write_bytes(b'x')
    import smollm_kit.checkpoint as ck
    mine = mgr.dir/ck._tmp_name('step_00000002'); mine.mkdir()
    mgr.save(3, {'w': torch.zeros(2)}, {})
    assert not dead.exists() and mine.exists()  # a live owner's temp dir is never touched

# --- rotation ----------------------------------------------------------------------------------------------------

def test_rotation_plan():
    assert rotation_plan([10, 20, 30, 40], keep_last=2) == [10, 20]
    assert rotation_plan([10, 20, 30, 40], keep_last=2, keep_every=20) == [10]
    assert rotation_plan([10, 20, 30, 40], keep_last=1, protect={10}) == [20, 30]
    assert rotation_plan([40], keep_last=1) == [] and rotation_plan([], keep_last=3) == []

def test_rotation_keeps_last_and_every(tmp_path):
    mgr = mgr_for(tmp_path, keep_last=2, keep_every=30)
    for s in range(10, 80, 10): mgr.save(s, {'w': torch.zeros(4)}, {})
    assert step_dirs(mgr.dir) == ['step_00000030', 'step_00000060', 'step_00000070']
    assert sorted(e['step'] for e in mgr.pop_events() if e['event'] == 'rotated') == [10, 20, 40, 50]

def test_rotation_never_deletes_the_only_valid_checkpoint(tmp_path, monkeypatch):
    "A save that fails leaves the previous (only valid) checkpoint alone, leaves no temp dir, and raises on wait()."
    import smollm_kit.checkpoint as ck
    mgr = mgr_for(tmp_path, keep_last=1, async_save=True)
    mgr.save(10, {'w': torch.zeros(4)}, {}); mgr.wait()
    def disk_full(*a, **k): raise OSError(28, 'No space left on device')
    with monkeypatch.context() as mp:
        mp.setattr(ck, 'save_model_state', disk_full)
        mgr.save(20, {'w': torch.ones(4)}, {})
        with pytest.raises(ck.DiskFullError, match=f'no space left on {mgr.dir}: this checkpoint needs ~'): mgr.wait()
    assert isinstance(mgr.error, ck.DiskFullError)                               # and raise_if_failed() raises it
    assert step_dirs(mgr.dir) == ['step_00000010'] and not list(mgr.dir.glob('.tmp-*'))
    assert mgr.latest_valid() == mgr.dir/'step_00000010'
    assert [e['event'] for e in mgr.pop_events()] == ['checkpoint_written', 'checkpoint_error']

def test_rotation_counts_only_valid_checkpoints(tmp_path):
    "A corrupted checkpoint never takes a keep_last slot, so the good fallback survives rotation."
    mgr = mgr_for(tmp_path, keep_last=2)
    for s in (10, 20): mgr.save(s, {'w': torch.zeros(4)}, {})
    _truncate(mgr.dir/'step_00000020')
    mgr.save(30, {'w': torch.ones(4)}, {})
    assert step_dirs(mgr.dir) == ['step_00000010', 'step_00000020', 'step_00000030']  # 20 left for a human to inspect
    _flip(mgr.dir/'step_00000030')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        assert mgr_for(tmp_path).latest_valid() == mgr.dir/'step_00000010'
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 2 and 'step_00000030: state.pt fails its sha256' in msgs[0] and 'step_00000020: model.safetensors has' in msgs[1]

# --- mirror ------------------------------------------------------------------------------------------------------

def test_mirror_rotation_and_resume_from_mirror_only(tmp_path):
    drive = tmp_path/'drive'
    mgr = mgr_for(tmp_path, keep_last=1, mirror_dir=str(drive), async_save=True)
    for s in (10, 20, 30): mgr.save(s, {'w': torch.full((1000,), float(s))}, {'step': s}); mgr.wait_for_mirror()
    assert mgr.wait_for_mirror(timeout=30)
    ev = mgr.pop_events()
    assert [e['step'] for e in ev if e['event'] == 'mirrored'] == [10, 20, 30]
    assert step_dirs(mgr.dir) == step_dirs(drive/'checkpoints') == ['step_00000030']
    assert {e['location'] for e in ev if e['event'] == 'rotated'} == {'local', 'mirror'}
    assert not list((drive/'checkpoints').glob('.tmp-*'))
    mgr.close()
    shutil.rmtree(tmp_path/'run')                                   # the Colab VM is gone; Drive survives
    fresh = mgr_for(tmp_path, keep_last=1, mirror_dir=str(drive))
    best = fresh.latest_valid()
    assert best == drive/'checkpoints/step_00000030'
    ms, st, _ = fresh.load(best)
    assert st == {'step': 30} and ms['w'][0] == 30
    assert verify_checkpoint(fresh.dir/'step_00000030') is None     # copied back locally
    assert [e['event'] for e in fresh.pop_events()] == ['restored_from_mirror']

def test_latest_valid_picks_newest_across_local_and_mirror(tmp_path):
    drive = tmp_path/'drive'
    mgr = mgr_for(tmp_path, mirror_dir=str(drive))
    for s in (10, 20): mgr.save(s, {'w': torch.full((10,), float(s))}, {'step': s})
    assert mgr.wait_for_mirror(timeout=30)
    shutil.rmtree(mgr.dir/'step_00000020')                          # newest only in the mirror
    assert mgr_for(tmp_path, mirror_dir=str(drive)).latest_valid() == drive/'checkpoints/step_00000020'
    mgr_for(tmp_path).save(30, {'w': torch.zeros(10)}, {'step': 30})  # newest only local (its mirror copy failed)
    assert mgr_for(tmp_path, mirror_dir=str(drive)).latest_valid() == mgr.dir/'step_00000030'
    _flip(drive/'checkpoints/step_00000020'); shutil.rmtree(mgr.dir/'step_00000030')
    with pytest.warns(UserWarning, match='state.pt fails'):        # a corrupted mirror copy falls back too
        assert mgr_for(tmp_path, mirror_dir=str(drive)).latest_valid() == mgr.dir/'step_00000010'
    with pytest.raises(ConfigError, match='checkpoint.mirror_dir'):
        CheckpointManager(tmp_path/'run', {'mirror_dir': str(tmp_path/'run')})

def test_mirror_retries_transient_errors_then_succeeds(tmp_path, monkeypatch):
    real, calls = shutil.copy2, {'n': 0}
    def flaky(src, dst, *a, **k):
        calls['n'] += 1
        if calls['n'] in (1, 2, 4): raise OSError(5, 'Input/output error (Drive)')   # attempt 3 fails mid-copy
        return real(src, dst, *a, **k)
    monkeypatch.setattr(shutil, 'copy2', flaky)
    drive = tmp_path/'drive'
    mgr = mgr_for(tmp_path, mirror_dir=str(drive), async_save=True)
    mgr.save(10, {'w': torch.arange(100.)}, {'step': 10}, config_yaml='a: 1\n')
    assert mgr.wait_for_mirror(timeout=30)
    ev = [e for e in mgr.pop_events() if e['event'].startswith('mirror')]
    assert [(e['event'], e.get('attempt') or e.get('attempts')) for e in ev] == \
           [('mirror_error', 1), ('mirror_error', 2), ('mirror_error', 3), ('mirrored', 4)]
    assert 'Input/output error' in ev[0]['error'] and ev[0]['retry_in_s'] == 0.01
    assert step_dirs(drive/'checkpoints') == ['step_00000010'] and not list((drive/'checkpoints').glob('.tmp-*'))
    assert verify_checkpoint(drive/'checkpoints/step_00000010') is None

def test_mirror_copy_that_arrives_corrupted_is_retried(tmp_path, monkeypatch):
    real, calls = shutil.copy2, {'n': 0}
    def bitrot(src, dst, *a, **k):
        out = real(src, dst, *a, **k)
        calls['n'] += 1
        if calls['n'] == 1: _flip_file(Path(dst))
        return out
    def _flip_file(f): b = bytearray(f.read_bytes()); b[-1] ^= 1; f.write_bytes(bytes(b))
    monkeypatch.setattr(shutil, 'copy2', bitrot)
    mgr = mgr_for(tmp_path, mirror_dir=str(tmp_path/'drive'), async_save=True)
    mgr.save(10, {'w': torch.arange(100.)}, {'step': 10})
    assert mgr.wait_for_mirror(timeout=30)
    ev = [e for e in mgr.pop_events() if e['event'].startswith('mirror')]
    assert [e['event'] for e in ev] == ['mirror_error', 'mirrored'] and 'fails its sha256' in ev[0]['error']
    assert verify_checkpoint(tmp_path/'drive/checkpoints/step_00000010') is None

def test_permanently_failing_mirror_never_stops_training(tmp_path):
    (tmp_path/'drive').write_text('not a directory: every mirror write fails')
    mgr = mgr_for(tmp_path, keep_last=2, mirror_dir=str(tmp_path/'drive/run'), async_save=True)
    mgr.mirror_retries = 3
    gate, mirror_one = threading.Event(), mgr._mirror_one    # hold every mirror copy until the three saves returned
    mgr._mirror_one = lambda *a: (gate.wait(), mirror_one(*a))[1]
    saver = threading.Thread(target=lambda: [mgr.save(s, {'w': torch.full((10,), float(s))}, {'step': s}) for s in (10, 20, 30)])
    saver.start(); saver.join(timeout=120)
    assert not saver.is_alive(), "save() waited for the (blocked) mirror"  # the loop never waits on the mirror
    gate.set()
    assert mgr.wait_for_mirror(timeout=60)
    mgr.save(40, {'w': torch.zeros(10)}, {'step': 40}); assert mgr.wait_for_mirror(timeout=30)
    ev = mgr.pop_events()
    assert [e['step'] for e in ev if e['event'] == 'mirror_failed'] == [10, 20, 30, 40]
    assert sum(e['event'] == 'mirror_error' for e in ev) == 12
    assert step_dirs(mgr.dir) == ['step_00000030', 'step_00000040']   # local rotation goes on regardless
    assert mgr.latest_valid() == mgr.dir/'step_00000040'

# --- killed mid-write --------------------------------------------------------------------------------------------

# A zygote imports torch once and forks one writer per round (torch imports take seconds on a busy 2-core box; the
# zygote itself never runs a parallel op, so forking it is safe). It reaps each killed writer and says so.
WRITER = textwrap.dedent('''
    import os, sys, torch
    from smollm_kit.checkpoint import CheckpointManager
    for line in sys.stdin:
        run, start = line.split(); start = int(start)
        pid = os.fork()
        if pid:
            os.waitpid(pid, 0); print('reaped', flush=True); continue
        mgr = CheckpointManager(run, {'keep_last': 2, 'keep_every': 7}, async_save=bool(start % 2))
        w = torch.empty(6 << 20)                    # 24 MB of weights + 24 MB of optimizer state per checkpoint
        print('ready', os.getpid(), flush=True)
        for step in range(start, 10**6):
            w.fill_(step)
            mgr.save(step, {'w': w, 'b': torch.arange(step % 97)}, {'step': step, 'm': w * 2, 'note': f'step {step}'})
''')

def test_save_killed_mid_write_never_leaves_a_broken_valid_checkpoint(tmp_path):
    script, run = tmp_path/'writer.py', tmp_path/'run'
    script.write_text(WRITER)
    env = {**os.environ, 'PYTHONPATH': f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rng, start, seen = random.Random(0), 1, set()
    zygote = subprocess.Popen([sys.executable, str(script)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for i in range(4):
        zygote.stdin.write(f"{run} {start}\n"); zygote.stdin.flush()
        word, pid = zygote.stdout.readline().split()
        assert word == 'ready'
        time.sleep(rng.uniform(0.4, 3.0))        # land anywhere: snapshot, serialising, hashing, renaming, rotating
        os.kill(int(pid), signal.SIGKILL)
        assert zygote.stdout.readline().strip() == 'reaped'
        mgr = CheckpointManager(run, {})
        for d in mgr.dir.glob('step_*'):           # a directory named like a checkpoint is always a whole one
            assert verify_checkpoint(d) is None, d
            s = int(d.name[5:])
            ms, st, _ = mgr.load(d)
            assert bool((ms['w'] == s).all()) and ms['b'].numel() == s % 97 and st['step'] == s
            assert bool((st['m'] == 2 * s).all()) and st['note'] == f'step {s}'
            seen.add(s)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')        # leftovers of the killed save are reported, not trusted
            best = mgr.latest_valid()
        if best is not None: start = int(best.name[5:]) + 1
    zygote.stdin.close(); zygote.wait(timeout=30); zygote.stdout.close()
    assert seen, 'the writer never completed a checkpoint: make the kill delays longer'
    mgr = CheckpointManager(run, {'keep_last': 2})
    mgr.save(start, {'w': torch.zeros(1)}, {'step': start}, block=True)
    assert not list(mgr.dir.glob('.tmp-*'))       # the next save cleans up after the dead writers

# --- cadence, signals, compatibility -----------------------------------------------------------------------------

def test_should_save_cadence(tmp_path):
    mgr = CheckpointManager(tmp_path, {'every_steps': 5, 'every_minutes': 1.0})
    t0 = time.monotonic()
    assert mgr.should_save(5) and not mgr.should_save(3, now=t0 + 30) and mgr.should_save(3, now=t0 + 61)
    mgr.save(5, {'w': torch.zeros(1)}, {}, block=True)
    assert not mgr.should_save(5)                             # just saved this step
    assert not mgr.should_save(6, now=time.monotonic() + 59) and mgr.should_save(6, now=time.monotonic() + 61)
    off = CheckpointManager(tmp_path, {'every_steps': None, 'every_minutes': None})
    assert not off.should_save(500, now=t0 + 1e6)
    with pytest.raises(ConfigError, match='checkpoint.keep_lst'): CheckpointManager(tmp_path, {'keep_lst': 1})

def test_rank_nonzero_writes_nothing(tmp_path):
    mgr = CheckpointManager(tmp_path, {}, rank=1)
    assert mgr.save(5, {'w': torch.zeros(1)}, {}) == tmp_path/'checkpoints/step_00000005'
    mgr.wait(); assert not (tmp_path/'checkpoints').exists()

def test_graceful_interrupt():
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulInterrupt() as g:
        assert g.installed and not g.requested
        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)
        assert g.requested and g.signum == signal.SIGTERM
    with GracefulInterrupt() as g:
        os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)      # first Ctrl-C: a flag, no exception
        assert g.requested and g.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):                      # second Ctrl-C: stop now
            os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before_int and signal.getsignal(signal.SIGTERM) is before_term
    out = {}
    def in_thread():
        with GracefulInterrupt() as g: out['installed'] = g.installed
    t = threading.Thread(target=in_thread); t.start(); t.join()
    assert out == {'installed': False} and signal.getsignal(signal.SIGTERM) is before_term

def test_check_resume_compat():
    old = load_config('tiny').to_dict()
    safe = load_config('tiny', {'train.max_steps': 400, 'train.eval_every': 10, 'checkpoint.mirror_dir': '/drive/x',
                                'cost.usd_per_hour': 1.2, 'run.run_dir': '/tmp/x', 'train.compile': True,
                                'model.attn_backend': 'sdpa', 'data.num_workers': 2,
                                'train.activation_checkpointing': True, 'logging.wandb': True}).to_dict()
    changes = check_resume_compat(old, safe)
    assert len(changes) == 10 and 'train.max_steps: 150 -> 400 (the LR schedule stretches or shrinks with it)' in changes
    assert check_resume_compat(old, old) == []
    for k, v in {'model.n_layers': 2, 'data.tokenizer': 'gpt2', 'run.seed': 1, 'train.seq_len': 64,
                 'train.micro_batch_size': 4, 'train.grad_accum_steps': 4, 'train.precision': 'fp32',
                 'optim.muon_lr': 0.01, 'model.tie_embeddings': False}.items():
        new = load_config('tiny', {k: v}).to_dict()
        with pytest.raises(ConfigError, match=rf'^{k}: changed since the checkpoint'): check_resume_compat(old, new)
        (w,) = check_resume_compat(old, new, force=True)
        assert w.startswith(f"UNSAFE (forced) {k}: ") and w.endswith(f" -> {v!r}")
    mix = load_config('tiny').to_dict(); mix['data']['domains'][2]['weight'] = 0.5
    with pytest.raises(ConfigError, match=r'data.domains\[2\].weight'): check_resume_compat(old, mix)
    src = load_config('tiny').to_dict(); src['data']['domains'][0]['sources'].append({'kind': 'local', 'path': 'x.txt'})
    with pytest.raises(ConfigError, match=r'data.domains\[0\].sources\[1\]'): check_resume_compat(old, src)
    newer = load_config('tiny').to_dict(); newer['train']['brand_new_knob'] = 1   # unknown fields are unsafe by default
    with pytest.raises(ConfigError, match='train.brand_new_knob: changed'): check_resume_compat(old, newer)
    both = load_config('tiny', {'train.max_steps': 9, 'model.d_model': 64}).to_dict()
    assert check_resume_compat(old, both, force=True) == ['train.max_steps: 150 -> 9 (the LR schedule stretches or shrinks with it)',
                                                          'UNSAFE (forced) model.d_model: 128 -> 64']


def test_sharded_save_in_one_process_and_a_full_disk(tmp_path, monkeypatch):
    "The DCP path of `save(sharded=...)`: a published, verified, mirrored checkpoint read back whole; a full disk leaves the previous one alone."
    from smollm_kit.checkpoint import DiskFullError, is_sharded, read_sharded, verify_checkpoint
    w = {'embed_tokens.weight': torch.randn(6, 4), 'norm.weight': torch.rand(4)}
    m = CheckpointManager(tmp_path/'run', {'every_steps': 1, 'mirror_dir': str(tmp_path/'drive')}, async_save=False)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        p = m.save(1, None, {'step': 1}, sharded={'model': w, 'optim': {}}, manifest_extra={'tied': {'lm_head.weight': 'embed_tokens.weight'}})
        m.wait_for_mirror()
        assert is_sharded(p) and verify_checkpoint(p) is None and not (p/'model.safetensors').exists()
        got = read_sharded(tmp_path/'drive'/'checkpoints'/p.name)                 # the mirror's copy, whole
        assert torch.equal(got['embed_tokens.weight'], w['embed_tokens.weight']) and got['lm_head.weight'] is got['embed_tokens.weight']
        monkeypatch.setattr(shutil, 'disk_usage', lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
        with pytest.raises(DiskFullError, match='no space left'):
            m.save(2, None, {'step': 2}, sharded={'model': w, 'optim': {}})
    assert [q.name for q in (tmp_path/'run'/'checkpoints').iterdir()] == ['step_00000001'] and verify_checkpoint(p) is None
    m.close()
