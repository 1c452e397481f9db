"""Ordinary mistakes in a config, a YAML file or the command line end in ONE line naming the field or file, exit code 2,
no traceback — and before any heavy work (no run directory is created). A generated set of malformed inputs runs
in-process through `smollm_kit.cli.main`; a few run as real subprocesses to prove the exit code end to end."""
import os, subprocess, sys
from pathlib import Path
import pytest, yaml
from smollm_kit.cli import main
from smollm_kit.config import load_config, Config
from dataclasses import fields

SECTIONS = [f.name for f in fields(Config)]

# (id, YAML text of the config file, what the error line must mention)
YAML_CASES = [
    ('top-level-list', '- run\n- model\n', 'must be a mapping of sections'),
    ('top-level-scalar', '5\n', 'must be a mapping of sections'),
    ('top-level-string', 'hello\n', 'must be a mapping of sections'),
    ('unclosed-bracket', 'train: {max_steps: 3\n', 'line 2'),
    ('bad-indent', 'train:\n  max_steps: 3\n bad: 1\n', 'line 3'),
    ('tab-indent', 'train:\n\tmax_steps: 3\n', 'line 2'),
    ('unclosed-quote', 'run: {name: "x}\n', 'not valid YAML'),
    ('duplicate-section', 'inherit: tiny\ntrain: {max_steps: 3}\ntrain: {max_steps: 4}\n', "duplicate key 'train'"),
    ('duplicate-field', 'inherit: tiny\ntrain:\n  max_steps: 3\n  max_steps: 4\n', "duplicate key 'max_steps'"),
    ('duplicate-line-col', 'inherit: tiny\nrun: {name: a}\nrun: {name: b}\n', 'line 3, column 1'),
    ('unknown-section', 'inherit: tiny\ntrainer: {max_steps: 3}\n', 'trainer: unknown key'),
    ('unknown-field', 'inherit: tiny\ntrain: {max_step: 3}\n', "did you mean 'max_steps'"),
    ('inherit-missing', 'inherit: no-such-preset\n', 'no-such-preset'),
    ('inherit-not-string', 'inherit: [tiny]\n', 'inherit: expected a preset name'),
    ('int-as-word', 'inherit: tiny\ntrain: {max_steps: many}\n', 'train.max_steps: expected an integer'),
    ('int-fraction', 'inherit: tiny\ntrain: {max_steps: 2.5}\n', 'train.max_steps: expected an integer'),
    ('int-as-list', 'inherit: tiny\ntrain: {micro_batch_size: [1, 2]}\n', 'train.micro_batch_size'),
    ('float-as-word', 'inherit: tiny\noptim: {muon_lr: fast}\n', 'optim.muon_lr: expected a number'),
    ('float-as-dict', 'inherit: tiny\noptim: {adamw_lr: {a: 1}}\n', 'optim.adamw_lr'),
    ('bool-as-word', 'inherit: tiny\nmodel: {tie_embeddings: maybe}\n', 'model.tie_embeddings: expected true or false'),
    ('bool-as-int', 'inherit: tiny\nlogging: {progress: 2}\n', 'logging.progress: expected true or false'),
    ('literal', 'inherit: tiny\ntrain: {precision: bf17}\n', 'train.precision: expected one of'),
    ('stage-literal', 'inherit: tiny\nrun: {stage: pretraining}\n', 'run.stage'),
    ('str-as-list', 'inherit: tiny\nrun: {name: [a, b]}\n', 'run.name: expected a string'),
    ('negative-steps', 'inherit: tiny\ntrain: {max_steps: -5}\n', 'train.max_steps: must be positive'),
    ('zero-batch', 'inherit: tiny\ntrain: {micro_batch_size: 0}\n', 'train.micro_batch_size'),
    ('heads', 'inherit: tiny\nmodel: {n_heads: 3}\n', 'model.d_model'),
    ('kv-heads', 'inherit: tiny\nmodel: {n_kv_heads: 3}\n', 'model.n_kv_heads'),
    ('seq-too-long', 'inherit: tiny\ntrain: {seq_len: 100000}\n', 'train.seq_len'),
    ('model-preset', 'inherit: tiny\nmodel: {preset: smollm-7b}\n', 'unknown model preset'),
    ('keep-last', 'inherit: tiny\ncheckpoint: {keep_last: 0}\n', 'checkpoint.keep_last'),
    ('resume-literal', 'inherit: tiny\ncheckpoint: {resume: sometimes}\n', 'checkpoint.resume'),
    ('no-domains', 'inherit: tiny\ndata: {domains: []}\n', 'data.domains'),
    ('domains-not-list', 'inherit: tiny\ndata: {domains: prose}\n', 'data.domains'),
    ('domain-weight', 'inherit: tiny\ndata: {domains: [{name: a, weight: -1, sources: [{kind: demo, path: prose}]}]}\n',
     'data.domains[0].weight'),
    ('betas', 'inherit: tiny\noptim: {betas: [0.9]}\n', 'optim.betas'),
    ('decay-frac', 'inherit: tiny\nschedule: {decay_frac: 2}\n', 'schedule.decay_frac'),
    ('every-steps', 'inherit: tiny\nlogging: {every_steps: 0}\n', 'logging.every_steps'),
    ('epochs-pretrain', 'inherit: tiny\ntrain: {epochs: 1}\n', 'train.epochs'),
] + [(f'section-scalar-{s}', f'inherit: tiny\n{s}: 5\n', f'{s}: expected a mapping') for s in SECTIONS]

# (id, --set overrides on the tiny preset, what the error line must mention)
SET_CASES = [
    ('no-equals', ['train.max_steps'], 'expected dotted.key=value'),
    ('unknown-section', ['trian.max_steps=3'], "did you mean 'train'"),
    ('unknown-field', ['train.maxsteps=3'], 'train.maxsteps: unknown key'),
    ('not-a-section', ['train.max_steps.x=3'], 'is not a section'),
    ('section-as-value', ['train=5'], 'train: expected a mapping'),
    ('bad-int', ['train.max_steps=ten'], 'train.max_steps: expected an integer'),
    ('bad-bool', ['logging.progress=perhaps'], 'logging.progress'),
    ('bad-literal', ['schedule.name=linear'], 'schedule.name'),
    ('negative-lr', ['optim.muon_lr=-1'], 'optim.muon_lr'),
    ('stage-mismatch', ['run.stage=sft'], 'run.stage'),
]

@pytest.fixture(autouse=True)
def offline(monkeypatch): monkeypatch.setenv('WANDB_MODE', 'disabled'); monkeypatch.setenv('HF_HUB_OFFLINE', '1')

def one_line_error(capsys, argv, run_dir:Path)->str:
    "Run `smollm *argv` in-process; assert exit code 2, one error line, no traceback, no run directory; the line."
    capsys.readouterr()
    rc = main([str(a) for a in argv] + ['--run-dir', str(run_dir)])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith('smollm: warning:')]
    assert rc == 2 and 'Traceback' not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith('smollm pretrain: error: ')
    assert not run_dir.exists()                     # refused before any heavy work
    return lines[0]

def test_at_least_fifty_cases(): assert len(YAML_CASES) + len(SET_CASES) + 5 >= 50

@pytest.mark.parametrize('name,text,needle', YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_bad_yaml_file(name, text, needle, tmp_path, capsys):
    p = tmp_path/f'{name}.yaml'; p.write_text(text)
    line = one_line_error(capsys, ['pretrain', '--config', p], tmp_path/'run')
    assert needle in line, line

@pytest.mark.parametrize('name,sets,needle', SET_CASES, ids=[c[0] for c in SET_CASES])
def test_bad_override(name, sets, needle, tmp_path, capsys):
    line = one_line_error(capsys, ['pretrain', '--config', 'tiny', *(a for s in sets for a in ('--set', s))], tmp_path/'run')
    assert needle in line, line

def test_bad_paths(tmp_path, capsys):
    assert 'is a directory' in one_line_error(capsys, ['pretrain', '--config', tmp_path], tmp_path/'run')
    assert "no preset or file named 'nope.yaml'" in one_line_error(capsys, ['pretrain', '--config', 'nope.yaml'], tmp_path/'run')
    bad = tmp_path/'binary.yaml'; bad.write_bytes(b'\xff\xfe\x00garbage')
    assert str(bad) in one_line_error(capsys, ['pretrain', '--config', bad], tmp_path/'run')
    f = tmp_path/'afile'; f.write_text('x')
    capsys.readouterr()
    assert main(['pretrain', '--config', 'tiny', '--run-dir', str(f)]) == 2
    err = capsys.readouterr().err
    assert f'{f} exists and is a file' in err and 'Traceback' not in err
    assert main(['pretrain', '--config', 'tiny', '--run-dir', str(f/'run')]) == 2
    assert f'{f} is a file' in capsys.readouterr().err

def test_integral_exponent_is_an_int(tmp_path):
    "YAML 1.1 (PyYAML) reads `1e3` as the string '1e3'; an int field still takes it."
    p = tmp_path/'c.yaml'; p.write_text('inherit: tiny\ntrain: {max_steps: 1e3, max_tokens: 2.5e4}\n')
    assert isinstance(yaml.safe_load('a: 1e3')['a'], str)
    cfg = load_config(p)
    assert cfg.train.max_steps == 1000 and cfg.train.max_tokens == 25000

def run(*argv, cwd=None):
    env = {**os.environ, 'WANDB_MODE': 'disabled', 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-m', 'smollm_kit.cli', *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)

def test_end_to_end_exit_codes(tmp_path):
    "A real process: the exit code and the absence of a traceback hold outside pytest too (see also test_robustness)."
    y = tmp_path/'s.yaml'; y.write_text('inherit: tiny\ntrain: 5\n')
    p = run('pretrain', '--config', y, '--set', 'train.max_steps=3', '--run-dir', tmp_path/'run')
    assert p.returncode == 2 and 'train: expected a mapping' in p.stderr and 'Traceback' not in p.stderr, p.stderr
