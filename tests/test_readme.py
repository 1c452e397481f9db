"The README's commands: the quickstart works from a wheel in a fresh virtual environment; CI runs the test command; the\nREADME is the course's front page (nbs/index.ipynb); the package docs list every module."
import json, math, os, re, shutil, subprocess, sys, sysconfig, venv
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
    """A new venv with no smollm_kit of its own that sees the packages of the environment running this test (torch & co.).

    That environment is wherever `pip install -e ".[dev]"` put them: the base interpreter, or a newcomer's own venv
    (a venv's `system_site_packages` would see the *base* interpreter instead, which in a venv lacks torch). The
    wheel is built with that environment's setuptools (>= 77, a dev dependency: the PEP 639 licence string needs
    it), as pip's build isolation would, but offline: the venv's own older setuptools is removed."""
    d = tmp_path_factory.mktemp('venv')
    venv.create(d, with_pip=True)
    py = str(d/'bin'/'python')
    site = subprocess.run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']])
    (Path(site)/'_outer_env.pth').write_text(''.join(f'{p}\n' for p in ours))  # after the venv's own packages
    subprocess.run([py, '-m', 'pip', 'uninstall', '-q', '-y', 'setuptools'], check=True)
    v = subprocess.run([py, '-c', 'import setuptools; print(setuptools.__version__)'], capture_output=True, text=True, check=True).stdout
    assert int(v.split('.')[0]) >= 77, f"setuptools {v.strip()} in this environment; pip install -e '.[dev]' brings >= 77"
    return d

def test_quickstart_from_wheel_in_fresh_venv(fresh_venv, tmp_path):
    cmd = readme_command('quickstart')
    assert cmd.startswith('pip install . && smollm pretrain --config tiny')
    repo = tmp_path/'repo'
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns('.git', 'runs', '*.egg-info', 'build', 'dist', '__pycache__', '.venv*'))
    env = {**os.environ, 'PATH': f"{fresh_venv/'bin'}:{os.environ['PATH']}", 'VIRTUAL_ENV': str(fresh_venv),
           'PIP_NO_INDEX': '1',              # never the network: every dependency is already on the machine
           'PIP_NO_BUILD_ISOLATION': '0',    # pip reads this inverted: 0 = no isolation, build with the installed setuptools
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
    assert '\nbash .ci/browser-deps\n' in ci and 'SMOLLM_REQUIRE_BROWSER=1' in ci  # a failed browser install fails CI
    assert readme_command('test').startswith('pip install -e ".[dev]"')

def test_readme_is_the_index_notebook():
    "nbs/index.ipynb is the README, cell by cell: edit both (nbdev builds the package docstring and llms.txt from it)."
    nb = json.loads((ROOT/'nbs/index.ipynb').read_text())
    cells = []
    for c in nb['cells']:
        assert c['cell_type'] == 'markdown', 'the index notebook is prose only'
        cells.append(re.sub(r'\A(#\|[^\n]*\n)+', '', ''.join(c['source'])).strip())
    assert '\n\n'.join(cells) == (ROOT/'README.md').read_text().strip(), "README.md and nbs/index.ipynb differ"

def test_package_docs_list_every_module():
    "nbdev lists a module in llms.txt and the package docstring only when its docstring says more than its summary."
    import ast
    mods = sorted(f'smollm_kit.{p.stem}' for p in (ROOT/'smollm_kit').glob('*.py') if not p.name.startswith('_'))
    llms = (ROOT/'nbs/llms.txt').read_text()
    doc = ast.get_docstring(ast.parse((ROOT/'smollm_kit/__init__.py').read_text())) or ''
    assert [m for m in mods if f'[{m}]' not in llms] == [], 'not in nbs/llms.txt (tag an overview markdown cell #| export)'
    assert [m for m in mods if f'`{m}`' not in doc] == [], 'not in the package docstring'
