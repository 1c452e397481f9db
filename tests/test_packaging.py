"""The package is ready to publish: the sdist and the wheel build (the wheel from the sdist, as pip does from PyPI),
the wheel carries the YAML presets (training and pipeline ones), the version is the one in `smollm_kit/__init__.py`,
and `twine check --strict` accepts both (the README renders on PyPI). Offline: built with this environment's
setuptools (no build isolation), as tests/test_readme.py does."""
import ast, importlib.util, re, shutil, subprocess, sys, tarfile, zipfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = ast.literal_eval(re.search(r'^__version__ = (.+)$', (ROOT/'smollm_kit/__init__.py').read_text(), re.M)[1])

@pytest.fixture(scope='module')
def dist(tmp_path_factory):
    if importlib.util.find_spec('build') is None: pytest.skip('needs `build` (pip install -e ".[dev]")')
    tmp = tmp_path_factory.mktemp('pkg')
    src = tmp/'src'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns('.git', 'runs', '*.egg-info', 'build', 'dist', '__pycache__', '.venv*', '_proc'))
    p = subprocess.run([sys.executable, '-m', 'build', '--no-isolation', '--outdir', str(tmp/'dist'), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp/'dist'

def test_sdist_and_wheel_build_with_the_presets(dist):
    whl, = dist.glob('*.whl'); sdist, = dist.glob('*.tar.gz')
    assert whl.name.startswith(f'smollm_kit-{VERSION}-') and sdist.name == f'smollm_kit-{VERSION}.tar.gz'
    names = zipfile.ZipFile(whl).namelist()
    presets = {p.name for p in (ROOT/'smollm_kit/configs').glob('*.yaml')}
    pipes = {p.name for p in (ROOT/'smollm_kit/configs/pipelines').glob('*.yaml')}
    assert presets and pipes
    assert {n.split('/')[-1] for n in names if re.fullmatch(r'smollm_kit/configs/[^/]+\.yaml', n)} == presets
    assert {n.split('/')[-1] for n in names if re.fullmatch(r'smollm_kit/configs/pipelines/[^/]+\.yaml', n)} == pipes
    mods = {f'smollm_kit/{p.name}' for p in (ROOT/'smollm_kit').glob('*.py')}
    assert mods <= set(names), sorted(mods - set(names))
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    assert f'Version: {VERSION}\n' in meta and 'smollm = smollm_kit.cli:main' in zipfile.ZipFile(whl).read(
        next(n for n in names if n.endswith('entry_points.txt'))).decode()
    in_sdist = tarfile.open(sdist).getnames()
    assert f'smollm_kit-{VERSION}/smollm_kit/configs/pipelines/tiny.yaml' in in_sdist

def test_twine_check_passes(dist):
    if importlib.util.find_spec('twine') is None: pytest.skip('needs `twine` (pip install -e ".[dev]")')
    p = subprocess.run([sys.executable, '-m', 'twine', 'check', '--strict', *map(str, sorted(dist.iterdir()))],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count('PASSED') == 2, p.stdout + p.stderr

def test_release_workflow_builds_checks_and_publishes_on_version_tags():
    yaml = pytest.importorskip('yaml')
    wf = yaml.safe_load((ROOT/'.github/workflows/release.yml').read_text())
    on = wf.get('on', wf.get(True))  # YAML 1.1 reads a bare `on:` as True
    assert on['push']['tags'] == ['v*']
    steps = [s.get('run', '') + s.get('uses', '') for job in wf['jobs'].values() for s in job['steps']]
    assert any('python -m build' in s for s in steps) and any('twine check' in s for s in steps)
    assert any(s.startswith('pypa/gh-action-pypi-publish') for s in steps)
    assert wf['jobs']['publish']['permissions']['id-token'] == 'write'  # trusted publishing: no stored token
