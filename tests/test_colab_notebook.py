"""SmolLM_Colab.ipynb, executed headless as Colab's Run all would (tiny pipeline, CPU): all four stages train, the
kernel is killed in the middle of DPO, and Run all again resumes DPO — the finished stages untouched — and ends with
the same DPO metrics as an uninterrupted run, then chats with, exports and "downloads" the model.

The notebook is steered by environment variables only (no edits): SMOLLM_PRESET=tiny picks the CPU pipeline,
SMOLLM_RUN_DIR=<tmp> replaces Google Drive, SMOLLM_MAX_STEPS keeps each stage to a few steps and SMOLLM_OVERRIDES
('key=value stage:key=value', as the CLI's --set) shrinks the demo data and makes DPO checkpoint often enough to be
killed between two checkpoints.
"""
import hashlib, json, os, re, signal, subprocess, shutil, sys, time
from pathlib import Path
import nbformat, pytest
from nbclient import NotebookClient
from jupyter_client import KernelManager
from smollm_kit.ui import saved_step
from smollm_kit.monitor import read_metrics

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT/'SmolLM_Colab.ipynb'
STEPS, DPO_STEPS = 3, 10
OVERRIDES = ('train.eval_every=0 logging.progress=false checkpoint.every_minutes=null sft:sft.demo_examples=300 '
             f'dpo:dpo.demo_pairs=200 dpo:train.max_steps={DPO_STEPS} dpo:checkpoint.every_steps=2 dpo:checkpoint.keep_last=10 '
             'dpo:logging.every_steps=1')
ENV = {'SMOLLM_PRESET': 'tiny', 'SMOLLM_MAX_STEPS': str(STEPS), 'SMOLLM_OVERRIDES': OVERRIDES}

def code_cells(nb): return [c for c in nb.cells if c.cell_type == 'code']
def train_cell_index(nb): return next(i for i, c in enumerate(code_cells(nb)) if 'panel.start()' in c.source)

def texts(cells)->str:
    "Everything the cells printed (streams, errors and text/plain results)."
    out = []
    for c in cells:
        for o in c.get('outputs', []):
            if o.output_type == 'stream': out.append(o.text)
            elif o.output_type == 'error': out.append(f"{o.ename}: {o.evalue}")
            elif 'text/plain' in o.get('data', {}): out.append(o.data['text/plain'])
    return '\n'.join(out)

def fingerprint(d:Path)->dict:
    "Every file under `d`: its content hash and modification time."
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(d.rglob('*')) if p.is_file()}

@pytest.fixture
def nb_env(monkeypatch, tmp_path):
    "The kernel's environment: the tiny pipeline, a temporary run directory, and this checkout importable."
    run_dir = tmp_path/'run'
    for k, v in {**ENV, 'SMOLLM_RUN_DIR': str(run_dir)}.items(): monkeypatch.setenv(k, v)
    monkeypatch.delenv('SMOLLM_STAGES', raising=False); monkeypatch.delenv('SMOLLM_MIRROR_DIR', raising=False)
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

def test_install_is_pinned_to_this_version_of_the_kit():
    "The install cell pins the kit's own version (PyPI first, then the repository's tag of it), never a moving main."
    import smollm_kit
    tomllib = pytest.importorskip('tomllib')  # Python 3.11+
    url = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['urls']['Repository']
    install = code_cells(nbformat.read(NB, as_version=4))[0].source
    assert re.search(r"^KIT_VERSION = '([^']+)'$", install, re.M)[1] == smollm_kit.__version__, "bump KIT_VERSION with __version__"
    assert "f'smollm_kit[colab]=={KIT_VERSION}'" in install and f"f'smollm_kit[colab] @ git+{url}@v{{KIT_VERSION}}'" in install
    assert 'except ImportError' in install and f'git+{url}\'' not in install

@pytest.mark.skipif(shutil.which('nbdev-clean') is None, reason='nbdev is not installed')
def test_committed_notebook_is_what_nbdev_clean_writes(tmp_path):
    "nbdev-clean (with pyproject's allowed_metadata_keys) leaves the committed notebook byte for byte as it is."
    copy = tmp_path/NB.name
    shutil.copy(NB, copy)
    subprocess.run(['nbdev-clean', '--fname', str(copy)], cwd=ROOT, check=True, capture_output=True)
    assert copy.read_bytes() == NB.read_bytes()

def last_by_step(run_dir:Path, key:str)->dict:
    recs, _ = read_metrics(run_dir)
    return {r['step']: r[key] for r in recs if key in r}

@pytest.mark.slow
def test_run_all_killed_during_dpo_then_run_all_resumes(nb_env, tmp_path):
    t0 = time.monotonic()
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
        kc.execute(cells[train].source)  # Run all reaches the training cell: train, without waiting
        deadline, step = time.monotonic() + 600, None
        while time.monotonic() < deadline:
            step = saved_step(nb_env/'dpo')
            if step is not None and step >= 2: break
            time.sleep(0.05)
        assert step is not None and step < DPO_STEPS, f"no DPO checkpoint to kill after (saved step {step})"
        os.kill(km.provisioner.pid, signal.SIGKILL)  # hard: no handler runs, no final checkpoint
        killed_at = saved_step(nb_env/'dpo')
    finally:
        kc.stop_channels()
        km.cleanup_resources() if not km.is_alive() else km.shutdown_kernel(now=True)
    assert killed_at < DPO_STEPS and not (nb_env/'dpo'/'stage_done.json').exists()
    for s in ('pretrain', 'sft'): assert (nb_env/s/'stage_done.json').is_file(), f"{s} should have finished before DPO"
    before = {s: fingerprint(nb_env/s) for s in ('pretrain', 'sft')}
    print(f"killed in DPO with checkpoints up to step {killed_at} ({time.monotonic() - t0:.0f}s)")

    t1 = time.monotonic()
    nb = run_notebook(tmp_path)  # reconnect, Run all
    out = texts(nb.cells)
    assert 'Traceback' not in out and 'Error' not in out, out[-3000:]
    assert f"== pretrain: finished earlier ({nb_env/'pretrain'}), skipping" in out and '== sft: finished earlier' in out
    assert {s: fingerprint(nb_env/s) for s in ('pretrain', 'sft')} == before, "the finished stages were touched"
    _, events = read_metrics(nb_env/'dpo')
    resumes = [e for e in events if e['event'] == 'resume']
    assert [e['step'] for e in resumes] == [killed_at] and resumes[0]['config_changes'] == [], resumes
    for s in ('dpo', 'rlvr'): assert (nb_env/s/'stage_done.json').is_file()
    assert sorted(last_by_step(nb_env/'dpo', 'train/loss')) == list(range(1, DPO_STEPS + 1))
    # the live plot of the resumed stage started from the run's history: its status ends at the last step
    train_html = ''.join(o.data.get('text/html', '') for o in code_cells(nb)[train].outputs if 'data' in o)
    assert f'dpo: step {DPO_STEPS} / {DPO_STEPS} (100%)' in train_html and f'rlvr: step {STEPS} / {STEPS} (100%)' in train_html
    # the finish line: a chat reply, the export, the download path, and the path to load the model from
    assert f"model: {nb_env/'rlvr'}" in out and '--- What is 12 + 7?' in out
    assert (nb_env/'hf'/'config.json').is_file() and f"the file is {nb_env/'hf.zip'}" in out
    assert f"load_model('{nb_env/'rlvr'}')" in out and 'Hub: skipped' in out
    print(f"second Run all: {time.monotonic() - t1:.0f}s")

    # the same DPO stage, uninterrupted, from the same SFT weights: the same metrics, step by step
    t2 = time.monotonic()
    ref = tmp_path/'ref'
    for s in ('pretrain', 'sft'): shutil.copytree(nb_env/s, ref/s)
    code = ("import os; from smollm_kit.pipeline import pipeline; from smollm_kit.panel import env_overrides; "
            f"pipeline('tiny', {str(ref)!r}, 'dpo', env_overrides())")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600, env=os.environ)
    assert p.returncode == 0, p.stderr[-3000:]
    for key in ('train/loss', 'train/rewards/accuracies', 'train/rewards/margins', 'val/rewards/accuracies'):
        assert last_by_step(nb_env/'dpo', key) == last_by_step(ref/'dpo', key), key
    print(f"uninterrupted DPO: {time.monotonic() - t2:.0f}s")
