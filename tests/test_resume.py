"""Exact resume: a run killed with SIGKILL at any moment — mid-step or mid-save — and resumed logs bit-identical
train/loss values for every step, compared with an uninterrupted run of the same config."""
import json, os, random, signal, subprocess, sys, time
from pathlib import Path
import pytest

STEPS = 30
ARGS = ['--config', 'tiny', '--set', f'train.max_steps={STEPS}', '--set', 'checkpoint.every_steps=4',
        '--set', 'logging.every_steps=1', '--set', 'train.eval_every=10', '--set', 'logging.progress=false',
        '--set', 'checkpoint.keep_last=2',
        # a smaller batch than the preset's keeps each run a few seconds; the mechanics are the same
        '--set', 'train.seq_len=64', '--set', 'train.micro_batch_size=4', '--set', 'train.grad_accum_steps=2']

def cmd(run_dir, *extra): return [sys.executable, '-m', 'smollm_kit.cli', 'pretrain', *ARGS, '--run-dir', str(run_dir), *extra]

def env(): return {**os.environ, 'WANDB_MODE': 'disabled', 'HF_HUB_OFFLINE': '1', 'PYTHONUNBUFFERED': '1'}

def losses(run_dir)->dict:
    "train/loss per step; a resumed run logs the steps after its checkpoint again, and the last record for a step wins."
    out = {}
    for line in (Path(run_dir)/'metrics.jsonl').read_text().splitlines():
        r = json.loads(line)
        if 'train/loss' in r and 'event' not in r: out[r['step']] = r['train/loss']
    return out

def events(run_dir, name): 
    return [json.loads(l) for l in (Path(run_dir)/'metrics.jsonl').read_text().splitlines() if json.loads(l).get('event') == name]

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp('ref')
    p = subprocess.run(cmd(d), env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = losses(d)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref

def run_and_kill(run_dir, when):
    "Start a run and SIGKILL it when `when(run_dir)` first holds (polled every few ms); return whether it was killed."
    p = subprocess.Popen(cmd(run_dir), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        if when(run_dir):
            p.send_signal(signal.SIGKILL); p.wait(); return True
        time.sleep(0.002)
    p.wait(); return False

def steps_logged(run_dir):
    f = Path(run_dir)/'metrics.jsonl'
    return len(losses(run_dir)) if f.exists() else 0

def saving_now(run_dir):
    "A checkpoint is being written: its temporary directory exists."
    return any(p.name.startswith('.tmp') for p in (Path(run_dir)/'checkpoints').glob('.*')) if (Path(run_dir)/'checkpoints').exists() else False

def finish_and_compare(run_dir, ref):
    p = subprocess.run(cmd(run_dir), env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = losses(run_dir)
    assert sorted(got) == sorted(ref)
    diff = {s: (got[s], ref[s]) for s in ref if got[s] != ref[s]}
    assert not diff, f"steps whose loss differs after resume: {diff}"
    return p.stdout

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_sigkill_at_random_step_resumes_bit_identical(reference, tmp_path, seed):
    k = random.Random(seed).randint(5, STEPS - 3)
    assert run_and_kill(tmp_path, lambda d: steps_logged(d) >= k), "run finished before it could be killed"
    out = finish_and_compare(tmp_path, reference)
    assert events(tmp_path, 'resume'), "the second run did not resume"
    assert 'resuming from step' in out

def test_sigkill_during_checkpoint_write_resumes_bit_identical(reference, tmp_path):
    killed = run_and_kill(tmp_path, saving_now)
    assert killed, "never caught a checkpoint mid-write"
    finish_and_compare(tmp_path, reference)

def checkpoints(run_dir): return sorted((Path(run_dir)/'checkpoints').glob('step_*'))

def test_sigkill_before_first_checkpoint_restarts_cleanly(reference, tmp_path):
    assert run_and_kill(tmp_path, lambda d: steps_logged(d) >= 2 and not checkpoints(d))
    assert steps_logged(tmp_path) < 4 and not checkpoints(tmp_path), "killed too late: a checkpoint already existed"
    finish_and_compare(tmp_path, reference)
    assert not events(tmp_path, 'resume'), "nothing to resume from: the second run must start afresh"

def test_resume_always_without_checkpoint_is_a_clear_error(tmp_path):
    p = subprocess.run(cmd(tmp_path, '--resume'), env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and 'has no valid checkpoint' in p.stderr and 'Traceback' not in p.stderr

def test_no_resume_refuses_a_run_dir_with_checkpoints(reference, tmp_path):
    subprocess.run(cmd(tmp_path), env=env(), capture_output=True, timeout=600, check=True)
    p = subprocess.run(cmd(tmp_path, '--no-resume'), env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and 'already has checkpoints' in p.stderr

def test_unsafe_config_change_is_refused_unless_forced(reference, tmp_path):
    assert run_and_kill(tmp_path, lambda d: steps_logged(d) >= 9)
    unsafe = ['--set', 'optim.muon_lr=0.01', '--set', 'train.max_steps=12']  # a new learning rate changes the run
    p = subprocess.run(cmd(tmp_path, *unsafe), env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and 'optim.muon_lr' in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert not events(tmp_path, 'resume'), "a refused resume must not have started"
    p = subprocess.run(cmd(tmp_path, *unsafe, '--force'), env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    changes = events(tmp_path, 'resume')[-1]['config_changes']
    assert any('UNSAFE (forced)' in c and 'muon_lr' in c for c in changes), changes
    assert any('max_steps' in c and 'UNSAFE' not in c for c in changes), changes  # a safe change needs no force
    assert max(losses(tmp_path)) == 12

def test_sigterm_saves_exits_143_and_resumes_bit_identical(reference, tmp_path):
    p = subprocess.Popen(cmd(tmp_path), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while steps_logged(tmp_path) < 6 and p.poll() is None: time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]   # 128 + SIGTERM: a scheduler can tell an interrupted run from a finished one
    saved = events(tmp_path, 'checkpoint')[-1]
    assert saved['reason'] == 'interrupt' and saved['step'] >= 6
    finish_and_compare(tmp_path, reference)
