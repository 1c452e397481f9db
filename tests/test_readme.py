"The README's quickstart command works from a wheel installed into a fresh virtual environment."
import json, math, os, re, shutil, subprocess, sys, venv
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def readme_command(name:str)->str:
    "The command in the README's ```bash block marked `<!-- readme-command: name -->`."
    m = re.search(rf'<!-- readme-command: {name} -->\s*```bash\n(.*?)\n```', (ROOT/'README.md').read_text(), re.S)
    assert m, f"README has no command marked {name}"
    return m.group(1).strip()

@pytest.fixture(scope='module')
def fresh_venv(tmp_path_factory):
    "A new venv that sees the machine's torch & co. (system site packages) but has no smollm_kit of its own."
    d = tmp_path_factory.mktemp('venv')
    venv.create(d, system_site_packages=True, with_pip=True)
    # Python 3.11's venv bundles an old setuptools that predates PEP 639 licence strings; build with the machine's
    subprocess.run([str(d/'bin'/'python'), '-m', 'pip', 'uninstall', '-q', '-y', 'setuptools'], check=True)
    return d

def test_quickstart_from_wheel_in_fresh_venv(fresh_venv, tmp_path):
    cmd = readme_command('quickstart')
    assert cmd.startswith('pip install . && smollm pretrain --config tiny')
    repo = tmp_path/'repo'
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns('.git', 'runs', '*.egg-info', 'build', 'dist', '__pycache__', '.venv*'))
    env = {**os.environ, 'PATH': f"{fresh_venv/'bin'}:{os.environ['PATH']}", 'VIRTUAL_ENV': str(fresh_venv),
           'PIP_NO_INDEX': '1',              # never the network: every dependency is already on the machine
           'PIP_NO_BUILD_ISOLATION': '0',    # build with the installed setuptools
           'WANDB_MODE': 'disabled', 'HF_HUB_OFFLINE': '1'}
    env.pop('PYTHONPATH', None)
    p = subprocess.run(['bash', '-c', cmd], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the package (and its YAML presets) came from the wheel in the venv, not from the source tree
    where = subprocess.run([str(fresh_venv/'bin'/'python'), '-c', 'import smollm_kit.config as c; print(c.__file__, c.list_presets())'],
                           cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert str(fresh_venv) in where and 'tiny' in where, where
    recs = [json.loads(l) for l in (repo/'runs/tiny/metrics.jsonl').read_text().splitlines()]
    val = [r['val/loss'] for r in recs if 'val/loss' in r]
    train = [r['train/loss'] for r in recs if 'train/loss' in r]
    assert train[0] > math.log(2048) - 1, train[0]               # starts near a uniform guess over the vocabulary
    assert len(val) >= 2 and val == sorted(val, reverse=True) and val[-1] < math.log(2048) - 2, val
    assert 'val/loss' in p.stdout  # the falling loss is printed, not just logged
    assert list((repo/'runs/tiny/checkpoints').glob('step_*/manifest.json'))

def test_ci_runs_the_readme_test_command():
    ci = (ROOT/'.ci/run').read_text()
    assert 'readme-command: test' in ci and 'nbdev-clean' in ci and 'nbdev-export' in ci
    assert readme_command('test').startswith('pip install -e ".[dev]"')
