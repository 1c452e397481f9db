"""The pretraining stage end to end through the shared Trainer: falling loss, every documented metric, stability
actions, and the trained run feeding `smollm generate` / `smollm export`."""
import json, math, subprocess, sys, os
from pathlib import Path
import pytest, torch
from smollm_kit import load_config, pretrain, load_model
from smollm_kit.monitor import read_metrics
from smollm_kit.trainer import Trainer, lm_loss
from smollm_kit.pretrain import PretrainStage
from smollm_kit.data import load_tokenizer, PretrainData
from smollm_kit.model import SmolLM

FIELDS = ['step', 'tokens', 'train/loss', 'train/grad_norm', 'train/lr', 'val/loss', 'val/ppl', 'val/loss/prose',
          'val/loss/code', 'val/loss/math', 'perf/tokens_per_sec', 'perf/mfu', 'cost/usd_spent', 'cost/tokens_per_dollar',
          'cost/eta_hours', 'gpu/memory_allocated_gb']

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    cfg = load_config('tiny', {'run.run_dir': str(d), 'train.max_steps': 60, 'train.eval_every': 30, 'logging.every_steps': 1,
                               'logging.progress': False, 'cost.usd_per_hour': 1.5, 'cost.peak_tflops': 1.0,
                               'checkpoint.every_steps': 30})
    seen = []
    res = pretrain(cfg, callbacks=[seen.append])
    return cfg, res, seen

def test_validation_loss_falls_clearly_below_uniform(run):
    cfg, res, _ = run
    recs, _ = read_metrics(res.run_dir)
    val = [r['val/loss'] for r in recs if 'val/loss' in r]
    assert res.step == 60 and [r['step'] for r in recs if 'val/loss' in r] == [0, 30, 60]   # before training, then every 30
    assert val[0] > math.log(cfg.model.vocab_size) - 0.5, val                             # a fresh model guesses uniformly
    assert val[-1] < math.log(cfg.model.vocab_size) - 2.0, val   # ln(2048) = 7.62

def test_every_documented_metric_is_logged(run):
    _, res, seen = run
    recs, events = read_metrics(res.run_dir)
    last = recs[-1]
    missing = [k for k in FIELDS if k not in last]
    assert not missing, missing
    assert last['tokens'] == 60 * 2048 and last['cost/usd_spent'] > 0 and 0 < last['perf/mfu']
    assert {'checkpoint'} <= {e['event'] for e in events}
    assert len(seen) >= 60 and all('step' in r for r in seen)  # callbacks got every record

def test_config_and_checkpoints_written(run):
    cfg, res, _ = run
    assert load_config(res.run_dir/'config.yaml') == cfg
    steps = sorted(p.name for p in (res.run_dir/'checkpoints').glob('step_*'))
    assert steps == ['step_00000030', 'step_00000060']

class Poisoned(PretrainStage):
    "The pretraining stage, with the loss multiplied by `value` (NaN, or a spike) whenever one given batch comes."
    def __init__(self, cfg, tok, bad, value):
        super().__init__(cfg, tok)
        self.bad, self.value, self.served = bad, value, []
    def next_batch(self, ctx):
        b = super().next_batch(ctx)
        if torch.equal(b['input_ids'], self.bad): self.served.append(ctx.step + 1)  # the step it is trained in
        return b
    def loss(self, model, batch):
        loss, n, m = super().loss(model, batch)
        if torch.equal(batch['input_ids'].cpu(), self.bad): loss = loss * self.value  # keyed on content, not on the step
        return loss, n, m

def poisoned_trainer(tmp_path, action, bad_step, value, **over):
    cfg = load_config('tiny', {'run.run_dir': str(tmp_path), 'train.max_steps': 40, 'train.eval_every': 0, 'logging.every_steps': 1,
                               'logging.progress': False, 'stability.action': action, 'stability.min_history': 10,
                               'checkpoint.every_steps': 10, 'train.seq_len': 64, 'train.micro_batch_size': 4, **over})
    tok = load_tokenizer(cfg); torch.manual_seed(cfg.run.seed)
    t = cfg.train
    with PretrainData(cfg.data, tok, t.seq_len, t.micro_batch_size, t.eval_batches, cfg.run.seed) as data:  # the same stream
        bad = [data.next_batch() for _ in range((bad_step - 1) * t.grad_accum_steps + 1)][-1]['input_ids']  # step's 1st micro-batch
    stage = Poisoned(cfg, tok, bad, value)
    return Trainer(cfg, SmolLM(cfg.model), stage, tokenizer=tok), stage

def test_nan_loss_skips_the_update(tmp_path):
    t, stage = poisoned_trainer(tmp_path, 'log', 25, float('nan'))
    before = {}
    def snap(rec):
        if rec.get('step') == 24 and 'train/loss' in rec: before.update({k: v.clone() for k, v in t.model.state_dict().items()})
        if rec.get('step') == 25 and 'train/loss' in rec:
            for k, v in t.model.state_dict().items(): assert torch.equal(v, before[k]), f"{k} changed on the NaN step"
    t.callbacks.append(snap)
    res = t.fit()
    _, events = read_metrics(res.run_dir)
    nan = [e for e in events if e['event'] == 'nan']
    assert stage.served == [25]
    assert len(nan) == 1 and nan[0]['step'] == 25 and nan[0]['action'] == 'skip'
    assert before and all(torch.isfinite(p).all() for p in t.model.parameters())

def test_spike_with_rollback_restores_last_checkpoint_and_skips_the_data(tmp_path):
    t, stage = poisoned_trainer(tmp_path, 'rollback', 25, 50.0)
    res = t.fit()
    recs, events = read_metrics(res.run_dir)
    spikes = [e for e in events if e['event'] == 'spike']
    rb = [e for e in events if e['event'] == 'rollback']
    assert spikes and {e['step'] for e in spikes} == {25} and {e['action'] for e in spikes} == {'rollback'}  # loss and/or grad norm
    assert len(rb) == 1 and rb[0]['step'] == 20 and rb[0]['from_step'] == 25   # back to the step-20 checkpoint
    # steps 21-25 were trained again after the rollback, on the data that came after the bad batch: it never came back
    assert stage.served == [25]
    assert res.step == 40 and math.isfinite(recs[-1]['train/loss'])

def test_trained_run_feeds_generate_and_export_cli(run, tmp_path):
    _, res, _ = run
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    p = subprocess.run([sys.executable, '-m', 'smollm_kit.cli', 'generate', '--checkpoint', str(res.run_dir), '--prompt', 'def ',
                        '--max-new-tokens', '8', '--temperature', '0'], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip(), p.stderr[-2000:]
    out = tmp_path/'hf'
    p = subprocess.run([sys.executable, '-m', 'smollm_kit.cli', 'export', '--checkpoint', str(res.run_dir), '--out', str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, tok = load_model(res.run_dir)
    ids = torch.tensor([tok('def add(a, b):\n    return')['input_ids']])
    with torch.no_grad(): torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)
    assert hf.config.model_type == 'smollm3'
