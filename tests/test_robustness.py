"""Never lose a run: a run directory whose checkpoints are all broken is refused (never restarted over), an invalid
checkpoint is renamed aside instead of overwritten, one writer per run directory, a full disk stops training with one
line and the previous checkpoint intact, interrupted runs exit 130/143, and ordinary mistakes end in one line, rc 2."""
import errno, json, os, shutil, signal, subprocess, sys, time, importlib.util
from pathlib import Path
import pytest
from smollm_kit.cli import main
from smollm_kit.checkpoint import verify_checkpoint
from smollm_kit.rundir import RunLock, LOCK_NAME, read_lock

FAST = ['--set', 'logging.progress=false', '--set', 'logging.every_steps=1', '--set', 'train.eval_every=0']
PRETRAIN = ['--config', 'tiny', '--set', 'train.seq_len=64', '--set', 'train.micro_batch_size=2',
            '--set', 'train.grad_accum_steps=1', *FAST]
STAGES = [s for s in ('pretrain', 'sft', 'dpo', 'rlvr') if importlib.util.find_spec(f'smollm_kit.{s}') is not None]

def env(): return {**os.environ, 'WANDB_MODE': 'disabled', 'HF_HUB_OFFLINE': '1', 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'disabled'); monkeypatch.setenv('HF_HUB_OFFLINE', '1')

def cli(capsys, *argv)->tuple[int, str, str]:
    "Run `smollm *argv` in this process: (exit code, stdout, stderr)."
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err

def records(run_dir)->list[dict]:
    return [json.loads(l) for l in (Path(run_dir)/'metrics.jsonl').read_text().splitlines()]

def stage_args(stage, base)->list:
    "Arguments for a very short run of `stage` (the later stages start from the tiny pretrained run `base`)."
    if stage == 'pretrain': return ['pretrain', *PRETRAIN]
    small = {'sft': ['sft.demo_examples=200', 'sft.val_examples=8', 'sft.eval_generations=4', 'train.micro_batch_size=2'],
             'dpo': ['dpo.demo_pairs=64', 'dpo.val_examples=8', 'train.micro_batch_size=2'],
             'rlvr': []}.get(stage, [])
    return [stage, '--config', f'{stage}-tiny', '--init-from', base, *FAST, *(a for o in small for a in ('--set', o))]

@pytest.fixture(scope='module')
def base(tmp_path_factory):
    "A finished 2-step tiny pretraining run with checkpoints at steps 1 and 2."
    d = tmp_path_factory.mktemp('base')/'run'
    assert main(['pretrain', *PRETRAIN, '--set', 'train.max_steps=2', '--set', 'checkpoint.every_steps=1',
                 '--set', 'checkpoint.keep_last=2', '--run-dir', str(d)]) == 0
    assert sorted(p.name for p in (d/'checkpoints').iterdir()) == ['step_00000001', 'step_00000002']
    return d

def snapshot_dir(d:Path)->dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}

# -- 1. a broken run is refused, an invalid checkpoint is never overwritten ----------------------------------------------
@pytest.mark.parametrize('stage', STAGES)
def test_all_checkpoints_invalid_is_refused(stage, base, tmp_path, capsys):
    run = tmp_path/'run'
    for s in ('step_00000001', 'step_00000002'): shutil.copytree(base/'checkpoints'/s, run/'checkpoints'/s)
    (run/'checkpoints/step_00000002/manifest.json').unlink()                 # newest: only its manifest is missing
    st = run/'checkpoints/step_00000001/state.pt'; st.write_bytes(st.read_bytes()[:100])   # older: truncated
    before = snapshot_dir(run)
    rc, out, err = cli(capsys, *stage_args(stage, base), '--set', 'train.max_steps=3', '--set', 'checkpoint.every_steps=1',
                       '--run-dir', run)
    assert rc == 2, err[-2000:]
    line = [l for l in err.splitlines() if 'error:' in l]
    assert len(line) == 1 and 'none is valid' in line[0] and 'Traceback' not in err
    assert 'step_00000002 (no manifest.json' in line[0] and 'step_00000001 (state.pt has 100 bytes' in line[0]
    assert '--run-dir' in line[0]
    after = snapshot_dir(run)
    assert after.pop('metrics.jsonl', b'') == b'' and after == before           # nothing trained, nothing overwritten

def test_invalid_newest_is_quarantined_not_overwritten(base, tmp_path, capsys):
    run = tmp_path/'run'; shutil.copytree(base, run)
    (run/'checkpoints/step_00000002/manifest.json').unlink()
    rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=3', '--set', 'checkpoint.every_steps=1',
                       '--set', 'checkpoint.keep_last=1', '--run-dir', run)
    assert rc == 0, err[-2000:]
    names = sorted(p.name for p in (run/'checkpoints').iterdir())
    kept = [n for n in names if n.startswith('invalid-step_00000002-no-manifest')]
    assert len(kept) == 1 and 'step_00000003' in names, names                  # kept aside, and rotation left it alone
    assert not (run/'checkpoints'/kept[0]/'manifest.json').exists() and (run/'checkpoints'/kept[0]/'model.safetensors').exists()
    written = [r['step'] for r in records(run) if r.get('event') == 'checkpoint_written']
    assert written[-2:] == [2, 3] and verify_checkpoint(run/'checkpoints/step_00000003') is None  # trained on from step 1
    assert 'resuming from step 1' in out and f'kept as {kept[0]}' in out
    assert [r['step'] for r in records(run) if r.get('event') == 'quarantined'] == [2]

def test_finished_run_says_already_complete(base, tmp_path, capsys):
    run = tmp_path/'run'; shutil.copytree(base, run)
    n = len(records(run))
    rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=2', '--set', 'checkpoint.every_steps=1',
                       '--set', 'checkpoint.keep_last=2', '--run-dir', run)
    assert rc == 0 and 'already complete at step 2/2' in out and '== done: step 2/2' in out, out + err
    assert 'steps 2 -> 2' not in out and len(records(run)) == n + 1    # no start screen; only the resume record added

def test_safe_config_change_is_printed(base, tmp_path, capsys):
    run = tmp_path/'run'; shutil.copytree(base, run)
    rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=3', '--set', 'checkpoint.every_steps=1',
                       '--set', 'checkpoint.keep_last=2', '--run-dir', run)
    assert rc == 0 and 'config changed since the checkpoint: ' in out and 'train.max_steps: 2 -> 3' in out, out + err

def test_force_after_shape_change_is_one_line(base, tmp_path, capsys):
    run = tmp_path/'run'; shutil.copytree(base, run)
    rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=3', '--set', 'model.n_layers=2', '--force',
                       '--run-dir', run)
    assert rc == 2 and 'Traceback' not in err and 'model of another shape' in err and '--run-dir' in err, err[-2000:]
    rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=3', '--set', 'model.n_layers=2', '--run-dir', run)
    assert rc == 2 and 'model.n_layers' in err and '--force' in err, err[-2000:]          # the hint names the flag

# -- 2. one writer per run directory -----------------------------------------------------------------------------------
def test_second_process_is_refused_and_stale_lock_taken_over(tmp_path, capsys):
    run = tmp_path/'run'
    holder = subprocess.Popen([sys.executable, '-c', f"from smollm_kit.rundir import RunLock; import time; "
                               f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == 'locked'
        rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=1', '--run-dir', run)
        assert rc == 2 and f'in use by pid {holder.pid}' in err and 'Traceback' not in err, err
        assert not (run/'metrics.jsonl').exists()                                   # refused before any work
    finally: holder.kill(); holder.wait()
    assert read_lock(run)['pid'] == holder.pid                                     # kill -9 left its lock behind
    with pytest.warns(UserWarning, match=f'taking over a stale lock .*process {holder.pid} is no longer running'):
        rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=1', '--run-dir', run)
    assert rc == 0, err[-2000:]
    assert read_lock(run) is None                                                   # released at the end

def test_second_trainer_in_same_process_is_refused(tmp_path):
    "A notebook cell re-run while the first still trains: same pid, so the in-process registry must refuse it."
    from smollm_kit.config import load_config
    from smollm_kit.pretrain import pretrain
    from smollm_kit.rundir import RunDirError
    over = ['train.max_steps=2', 'train.seq_len=64', 'train.micro_batch_size=2', 'logging.progress=false', 'logging.every_steps=1',
            'train.eval_every=0', 'checkpoint.every_steps=null', f'run.run_dir={tmp_path/"run"}']
    seen = []
    def second(record):
        if record.get('step') == 1 and 'train/loss' in record and not seen:
            with pytest.raises(RunDirError, match='this same process'): pretrain(load_config('tiny', over))
            seen.append(True)
    res = pretrain(load_config('tiny', over), callbacks=[second])
    assert seen and res.step == 2 and read_lock(tmp_path/'run') is None
    def boom(record):
        if 'train/loss' in record: raise RuntimeError('a bug in a callback')
    with pytest.raises(RuntimeError, match='a bug'):
        pretrain(load_config('tiny', [*over, f'run.run_dir={tmp_path/"run2"}']), callbacks=[boom])
    assert read_lock(tmp_path/'run2') is None                                       # released on an exception too

# -- 3. a full disk ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('stage', STAGES)
def test_disk_full_stops_with_one_line(stage, base, tmp_path, capsys, monkeypatch):
    import smollm_kit.checkpoint as ck
    calls, real = [], ck.save_model_state
    def writer(*a, **k):
        calls.append(1)
        if len(calls) >= 2: raise OSError(errno.ENOSPC, 'No space left on device')
        return real(*a, **k)
    monkeypatch.setattr(ck, 'save_model_state', writer)
    run = tmp_path/'run'
    rc, out, err = cli(capsys, *stage_args(stage, base), '--set', 'train.max_steps=6', '--set', 'checkpoint.every_steps=1',
                       '--set', 'checkpoint.keep_last=3', '--run-dir', run)
    assert rc == 2 and 'Traceback' not in err, err[-3000:]
    assert 'checkpoint of step 2 FAILED' in err                                     # reported when it happened
    assert f'error: no space left on {run/"checkpoints"}: this checkpoint needs ~' in err and ' free' in err
    recs = records(run)
    assert [r['step'] for r in recs if r.get('event') == 'checkpoint_error'] == [2]
    assert max(r['step'] for r in recs if 'train/loss' in r) <= 4                  # stopped at a step boundary soon after
    assert sorted(p.name for p in (run/'checkpoints').iterdir()) == ['step_00000001']   # no temp dir left
    assert verify_checkpoint(run/'checkpoints/step_00000001') is None              # the previous one is intact
    assert read_lock(run) is None

def test_free_space_checked_before_saving(tmp_path, capsys, monkeypatch):
    import smollm_kit.checkpoint as ck
    from collections import namedtuple
    monkeypatch.setattr(ck.shutil, 'disk_usage', lambda p: namedtuple('u', 'total used free')(10**6, 10**6 - 4096, 4096))
    run = tmp_path/'run'
    rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=3', '--set', 'checkpoint.every_steps=1',
                       '--run-dir', run)
    assert rc == 2 and 'no space left on' in err and '4.0 KiB free' in err and 'Traceback' not in err, err[-2000:]
    assert not any((run/'checkpoints').iterdir()) and [r for r in records(run) if r.get('event') == 'checkpoint_error']

def _mount_tmpfs(d:Path, opts:str)->bool:
    if os.geteuid() != 0 or not shutil.which('mount'): return False
    d.mkdir(parents=True, exist_ok=True)
    return subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', str(d)], capture_output=True).returncode == 0

def test_real_full_and_read_only_filesystems(tmp_path, capsys):
    "A real 3 MB filesystem (in-process) and a read-only one (a real subprocess); needs root and tmpfs, skipped otherwise."
    small, ro = tmp_path/'small', tmp_path/'ro'
    if not _mount_tmpfs(small, 'size=3m'): pytest.skip("cannot mount a tmpfs here")
    try:
        rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=3', '--set', 'checkpoint.every_steps=1',
                           '--run-dir', small/'run')
        assert rc == 2 and 'Traceback' not in err, err[-3000:]
        assert f'no space left on {small}/run/checkpoints' in err
        assert not [q for q in (small/'run/checkpoints').iterdir()]
        assert _mount_tmpfs(ro, 'size=1m,ro')
        try:
            p = subprocess.run([sys.executable, '-m', 'smollm_kit.cli', 'pretrain', *PRETRAIN, '--run-dir', str(ro/'run')],
                               capture_output=True, text=True, env=env(), timeout=300)
            assert p.returncode == 2 and f'cannot write in {ro}' in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]
            assert p.stdout == ''                                                    # before any heavy work
        finally: subprocess.run(['umount', str(ro)])
    finally: subprocess.run(['umount', str(small)])

# -- 6. exit codes -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('sig,code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_run_exits_128_plus_signal(sig, code, tmp_path):
    from smollm_kit.config import load_config
    from smollm_kit.pretrain import pretrain
    over = ['train.max_steps=5', 'train.seq_len=64', 'train.micro_batch_size=2', 'logging.progress=false', 'logging.every_steps=1',
            'train.eval_every=0', f'run.run_dir={tmp_path/"run"}']
    def send(record):
        if record.get('step') == 2 and 'train/loss' in record: os.kill(os.getpid(), sig)
    res = pretrain(load_config('tiny', over), callbacks=[send])
    assert res.interrupted and res.signal == sig.name and res.exit_code == code and res.step == 2
    assert verify_checkpoint(tmp_path/'run/checkpoints/step_00000002') is None

def test_cli_exit_code_after_sigterm(tmp_path, capsys, monkeypatch):
    "The command line exits 143 after a SIGTERM (and the save), not 0: a scheduler can requeue the run."
    from smollm_kit.trainer import Trainer
    real = Trainer.train_step
    def step(self):
        out = real(self)
        if self.step == 1: os.kill(os.getpid(), signal.SIGTERM)   # arrives during step 2
        return out
    monkeypatch.setattr(Trainer, 'train_step', step)
    rc, out, err = cli(capsys, 'pretrain', *PRETRAIN, '--set', 'train.max_steps=50', '--run-dir', tmp_path/'run')
    assert rc == 143 and 'interrupted' in out, out + err
    assert [r['step'] for r in records(tmp_path/'run') if r.get('event') == 'checkpoint' and r.get('reason') == 'interrupt'] == [2]

# -- 5. children die with the trainer ------------------------------------------------------------------------------------
def test_die_with_parent_takes_grandchildren_down():
    code = ("import subprocess, sys, time; from smollm_kit.interrupt import die_with_parent; die_with_parent(); "
            "subprocess.Popen([sys.executable, '-c', 'from smollm_kit.interrupt import die_with_parent; import os, time; "
            "die_with_parent(); print(os.getpid(), flush=True); time.sleep(60)']); time.sleep(60)")
    child = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True, env=env())
    grandchild = int(child.stdout.readline())
    child.kill(); child.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try: state = Path(f'/proc/{grandchild}/stat').read_text().rsplit(')', 1)[1].split()[0]
        except FileNotFoundError: break
        if state == 'Z': break
        time.sleep(0.05)
    else: pytest.fail("the grandchild outlived its parent")

def _descendants(root:int)->list[int]:
    kids = {}
    for d in Path('/proc').iterdir():
        if d.name.isdigit():
            try: kids.setdefault(int((d/'stat').read_text().rsplit(')', 1)[1].split()[1]), []).append(int(d.name))
            except (OSError, IndexError): pass
    out, todo = [], [root]
    while todo: todo += kids.get(todo.pop(), []); out += [k for k in todo if k not in out]
    return out

def _alive(pid:int)->bool:
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError: return False

@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason="needs /proc (Linux)")
def test_kill_9_leaves_no_worker_processes(tmp_path):
    "kill -9 of a run with tokenizer workers: the workers, the forkserver and the resource tracker all go with it."
    run = tmp_path/'run'
    p = subprocess.Popen([sys.executable, '-m', 'smollm_kit.cli', 'pretrain', *PRETRAIN, '--set', 'data.num_workers=2',
                          '--set', 'train.max_steps=500', '--run-dir', str(run)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if (run/'metrics.jsonl').exists() and 'train/loss' in (run/'metrics.jsonl').read_text(): break
            time.sleep(0.1)
        children = _descendants(p.pid)
        assert len(children) >= 3, children                  # 2 workers + forkserver (+ resource tracker)
    finally: p.kill(); p.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(map(_alive, children)): time.sleep(0.2)
    left = [c for c in children if _alive(c)]
    for c in left: os.kill(c, signal.SIGKILL)
    assert not left, f"still alive 20 s after kill -9 of their trainer: {left}"
