"Tests of bench/gpu_check.py: it runs end to end (dry run, CPU) where datasets / wandb / IPython / ipywidgets / flash_attn are missing, as on the bare GPU box."
import importlib.util, json, os, subprocess, sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT/'bench'/'gpu_check.py'
BLOCKED = ('datasets', 'wandb', 'IPython', 'ipywidgets', 'flash_attn')

# Installed first in the child: a meta-path finder refusing the blocked packages, and None in sys.modules so that
# importlib.util.find_spec(name) answers None, exactly as for a package that is not installed.
PRELUDE = f"""
import sys
BLOCKED = {BLOCKED!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED: raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, Block())
for n in BLOCKED: sys.modules[n] = None
"""

def run_blocked(code:str, timeout:int=240)->subprocess.CompletedProcess:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT), 'HF_HUB_OFFLINE': '1'}
    return subprocess.run([sys.executable, '-c', PRELUDE + code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

def load_script():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_package_and_data_import_without_torch():
    "The blocker works, and tokenizer worker processes (which import smollm_kit.data) do not pay for torch."
    p = run_blocked("""
import importlib.util
assert importlib.util.find_spec('datasets') is None
try: import wandb
except ImportError: print('blocked')
import smollm_kit, smollm_kit.data
print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))
""")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ['blocked', '[]'], p.stdout


def test_everything_gpu_check_touches_imports_without_optional_packages():
    p = run_blocked("""
import importlib, types
from smollm_kit.generate import generate_ids       # a submodule named like a public function is imported first...
import smollm_kit
for m in ['config', 'model', 'monitor', 'optim', 'checkpoint', 'corpus', 'tokenizer', 'data', 'export', 'generate',
          'trainer', 'pretrain']:
    importlib.import_module('smollm_kit.' + m)
from transformers import SmolLM3ForCausalLM
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode
assert isinstance(smollm_kit.generate, types.FunctionType), smollm_kit.generate   # ...the attribute is the function
assert isinstance(smollm_kit.pretrain, types.FunctionType), smollm_kit.pretrain
from smollm_kit import generate, load_model, export_hf
assert generate.__module__ == 'smollm_kit.generate' and load_model.__module__ == 'smollm_kit.export'
assert smollm_kit.load_config('tiny').model.preset == 'tiny'
try: smollm_kit.no_such_name
except AttributeError as e: print('AttributeError', e)
print('ok', sorted(n for n in BLOCKED if sys.modules.get(n) is not None))
""")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "AttributeError module 'smollm_kit' has no attribute 'no_such_name'" in p.stdout
    assert 'ok []' in p.stdout


def test_dry_run_without_optional_packages(tmp_path):
    p = run_blocked(f"""
import runpy
sys.argv = ['bench/gpu_check.py', '--dry-run', '--out', {str(tmp_path)!r}]
runpy.run_path('bench/gpu_check.py', run_name='__main__')
""")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path/'gpu_check.json').read_text())
    S = res['sections']
    assert list(S) == load_script().SECTIONS  # every section ran (or said why not)
    for name, r in S.items(): assert r['status'] == 'ok' or r['status'].startswith('skipped'), (name, r)
    for name in ('train_blocks', 'train_whole'): assert S[name]['status'].startswith('skipped: dry-run')
    assert S['memory']['status'].startswith('skipped: no CUDA')
    assert S['attention']['agree'] is True and S['attention']['flex']['ok'] is True
    assert S['attention']['flash'].startswith('skipped') and 'flash_attn' in S['attention']['flash']
    assert S['train_hf']['loss_diff'] < 1e-3                 # the transformers model is the same model
    assert S['train_hf']['ratio_eager'] > 0
    assert S['trainer']['data'].startswith('synthetic') and 'datasets' in S['trainer']['data']
    assert S['trainer']['bare_tokens_per_sec'] > 0 and S['trainer']['trainer_tokens_per_sec'] > 0
    g = S['generate']
    assert g['kit_generated'] == g['hf_generated'] == g['batch'] * g['new_tokens']
    a = S['dtype_audit']
    assert a['ops_forward'] > 0 and a['ops_backward'] > 0 and a['non_bf16_count'] == 0, a
    assert S['precision_fp16']['finite'] is True
    assert S['profile']['top'] and abs(sum(S['profile']['by_kind'].values()) - 1) < 0.01
    assert S['checkpoint']['gb'] > 0
    assert '| goal | value | target | met |' in p.stdout and '| trainer |' in p.stdout


def test_trainer_section_on_demo_data(tmp_path):
    "With `datasets` present the trainer section runs the real pretrain stage on the demo corpus."
    pytest.importorskip('datasets')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT), 'HF_HUB_OFFLINE': '1'}
    p = subprocess.run([sys.executable, str(SCRIPT), '--dry-run', '--only', 'trainer', '--data', 'demo', '--out', str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path/'gpu_check.json').read_text())['sections']['trainer']
    assert r['status'] == 'ok' and r['data'].startswith('demo corpus'), r
    assert r['checkpoint_stall_s'] is not None and r['trainer_steps_timed'] >= 1


@pytest.fixture
def check(tmp_path):
    gc = load_script()
    a = gc.argparse.Namespace(out=str(tmp_path), quick=False, dry_run=True, only=None, budget=60, micro_batch=None, data='auto')
    return gc, gc.Check(a)

def test_a_failing_section_is_recorded_and_the_next_still_runs(check):
    gc, c = check
    c.run('boom', lambda: 1 / 0, budget=10)
    c.run('fine', lambda: {'x': 1}, budget=10)
    c.run('skip', lambda: (_ for _ in ()).throw(gc.Skip('no CUDA')), budget=10)
    S = json.loads((c.out/'gpu_check.json').read_text())['sections']   # written after every section
    assert S['boom']['status'].startswith('error: ZeroDivisionError') and 'traceback' in S['boom']
    assert S['fine'] == {'status': 'ok', 'x': 1, 'seconds': S['fine']['seconds']}
    assert S['skip']['status'] == 'skipped: no CUDA'

def test_a_section_over_budget_is_stopped(check):
    gc, c = check
    def spin():
        while True: pass
    c.run('slow', spin, budget=1)
    assert c.res['sections']['slow']['status'].startswith('timeout')

def test_out_of_memory_retries_with_half_the_batch(check):
    gc, c = check
    def fn(mb):
        if mb > 2: raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return {'micro_batch': mb}
    rec = {}
    assert gc.with_oom_retry(c, fn, 8, rec) == {'micro_batch': 2}
    assert rec['oom_at'] == [8, 4]
    with pytest.raises(ValueError): gc.with_oom_retry(c, lambda mb: (_ for _ in ()).throw(ValueError('bad')), 8, {})
