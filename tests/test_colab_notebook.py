"""SmolLM_Colab.ipynb, executed headless as Colab's Run all would (tiny preset, CPU): it trains, it resumes when run
again, and it resumes after the kernel is killed in the middle of training.

The notebook is steered by environment variables only (no edits): SMOLLM_PRESET=tiny picks the CPU model,
SMOLLM_RUN_DIR=<tmp> replaces Google Drive, SMOLLM_MAX_STEPS shortens the run and SMOLLM_OVERRIDES
('key=value ...', as the CLI's --set) makes checkpoints frequent enough to kill a run between two of them.
"""
import json, os, signal, subprocess, shutil, sys, time
from pathlib import Path
import nbformat, pytest
from nbclient import NotebookClient
from jupyter_client import KernelManager
from smollm_kit.ui import saved_step

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT/'SmolLM_Colab.ipynb'
STEPS = 20
ENV = {'SMOLLM_PRESET': 'tiny', 'SMOLLM_MAX_STEPS': str(STEPS),
       'SMOLLM_OVERRIDES': 'checkpoint.every_steps=5 checkpoint.every_minutes=null checkpoint.keep_last=20 '
                           'train.eval_every=10 logging.every_steps=1'}

def code_cells(nb): return [c for c in nb.cells if c.cell_type == 'code']
def train_cell_index(nb): return next(i for i, c in enumerate(code_cells(nb)) if 'pretrain(' in c.source)

def texts(cells)->str:
    "Everything the cells printed (streams and text/plain results)."
    out = []
    for c in cells:
        for o in c.get('outputs', []):
            if o.output_type == 'stream': out.append(o.text)
            elif o.output_type == 'error': out.append(f"{o.ename}: {o.evalue}")
            elif 'text/plain' in o.get('data', {}): out.append(o.data['text/plain'])
    return '\n'.join(out)

def read_metrics(run_dir:Path)->list[dict]: return [json.loads(l) for l in (run_dir/'metrics.jsonl').read_text().splitlines() if l.strip()]

def last_by_step(recs, key)->dict:
    "`key` at every step, the last record winning (as readers must after a resume)."
    return {r['step']: r[key] for r in recs if key in r and 'event' not in r}

@pytest.fixture
def nb_env(monkeypatch, tmp_path):
    "The kernel's environment: the tiny preset, a temporary run directory, and this checkout importable."
    run_dir = tmp_path/'run'
    for k, v in {**ENV, 'SMOLLM_RUN_DIR': str(run_dir)}.items(): monkeypatch.setenv(k, v)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p))
    monkeypatch.delenv('COLAB_RELEASE_TAG', raising=False)
    return run_dir

def run_notebook(workdir:Path, timeout:int=900):
    "Execute the committed notebook top to bottom in a fresh kernel; return the executed copy."
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(workdir)}}).execute()
    return nb

def test_committed_notebook_is_clean_and_has_colab_metadata():
    nb = nbformat.read(NB, as_version=4)
    nbformat.validate(nb)
    for c in code_cells(nb):
        assert c.outputs == [] and c.execution_count is None, f"cell {c.id} has outputs: commit the notebook cleared"
    for c in nb.cells: assert set(c.metadata) <= {'id'}, f"cell {c.id} carries metadata {dict(c.metadata)}"
    md = nb.metadata
    assert md['accelerator'] == 'GPU' and md['colab'] == {'gpuType': 'T4', 'provenance': []}
    assert md['kernelspec']['name'] == 'python3' and md['kernelspec']['language'] == 'python'
    tomllib = pytest.importorskip('tomllib')  # Python 3.11+
    url = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['urls']['Repository']
    install = code_cells(nb)[0].source
    assert f'git+{url}' in install and 'except ImportError' in install, "install cell: pip install the repository only when import fails"

@pytest.mark.skipif(shutil.which('nbdev-clean') is None, reason='nbdev is not installed')
def test_committed_notebook_is_what_nbdev_clean_writes(tmp_path):
    "nbdev-clean (with pyproject's allowed_metadata_keys) leaves the committed notebook byte for byte as it is."
    copy = tmp_path/NB.name
    shutil.copy(NB, copy)
    subprocess.run(['nbdev-clean', '--fname', str(copy)], cwd=ROOT, check=True, capture_output=True)
    assert copy.read_bytes() == NB.read_bytes()

@pytest.mark.slow
def test_run_all_trains_then_resumes(nb_env, tmp_path):
    t0 = time.monotonic()
    nb = run_notebook(tmp_path)
    out = texts(nb.cells)
    assert f"new run in {nb_env}" in out and f"== done: step {STEPS}/{STEPS}" in out
    assert saved_step(nb_env) == STEPS and (nb_env/'config.yaml').exists()
    recs = read_metrics(nb_env)
    losses = last_by_step(recs, 'train/loss')
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1] - 0.5
    train = code_cells(nb)[train_cell_index(nb)]
    images = [o for o in train.outputs if 'image/png' in o.get('data', {})]
    assert len(images) == 1, f"the live plot must be one display updated in place, found {len(images)} images"
    assert f"step {STEPS} / {STEPS} (100%)" in ''.join(o.data.get('text/html', '') for o in train.outputs if 'data' in o)
    assert "--- 'def add(a, b):'" in out and 'step_' in out   # samples printed, checkpoints listed
    print(f"first Run all: {time.monotonic() - t0:.1f}s")

    t0 = time.monotonic()
    nb = run_notebook(tmp_path)  # Run all again, as after a disconnect: finds the run and resumes it
    out = texts(nb.cells)
    assert f"resuming from step {STEPS} in {nb_env}" in out
    resumes = [r for r in read_metrics(nb_env) if r.get('event') == 'resume']
    assert [r['step'] for r in resumes] == [STEPS] and resumes[0]['config_changes'] == [], resumes
    print(f"second Run all: {time.monotonic() - t0:.1f}s")

@pytest.mark.slow
def test_resumes_after_the_kernel_is_killed_mid_training(nb_env, tmp_path):
    nb = nbformat.read(NB, as_version=4)
    cells, train = code_cells(nb), train_cell_index(nb)
    km = KernelManager(kernel_name='python3')
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client(); kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        for c in cells[:train]:
            reply = kc.execute_interactive(c.source, timeout=300, output_hook=lambda msg: None)
            assert reply['content']['status'] == 'ok', f"cell failed before training: {reply['content']}"
        kc.execute(cells[train].source)  # train, without waiting
        deadline, step = time.monotonic() + 600, None
        while time.monotonic() < deadline:
            step = saved_step(nb_env)
            if step is not None and step >= 5: break
            time.sleep(0.05)
        assert step is not None and step < STEPS, f"no checkpoint to kill after (saved step {step})"
        os.kill(km.provisioner.pid, signal.SIGKILL)  # hard: no handler runs, no final checkpoint
        killed_at = saved_step(nb_env)
    finally:
        kc.stop_channels()
        km.cleanup_resources() if not km.is_alive() else km.shutdown_kernel(now=True)
    assert killed_at < STEPS
    logged = max(last_by_step(read_metrics(nb_env), 'train/loss'))
    print(f"killed with checkpoints up to step {killed_at}, metrics up to step {logged}")

    nb = run_notebook(tmp_path)  # reconnect, Run all
    out = texts(nb.cells)
    assert f"resuming from step {killed_at} in {nb_env}" in out and f"== done: step {STEPS}/{STEPS}" in out
    recs = read_metrics(nb_env)
    resumes = [r for r in recs if r.get('event') == 'resume']
    assert [r['step'] for r in resumes] == [killed_at]
    assert resumes[0]['config_changes'] == [], f"the notebook must resume with the saved config: {resumes[0]}"
    assert sorted(last_by_step(recs, 'train/loss')) == list(range(1, STEPS + 1))
    assert saved_step(nb_env) == STEPS
