"FLOPs/MFU, GPU tables, cost, the start-of-run estimate, stability detection and the metrics sinks."
import json, math, random, time, types, warnings
import pytest, torch
from smollm_kit.config import CostConfig, ModelConfig, StabilityConfig, load_config, MODEL_PRESETS
from smollm_kit import monitor
from smollm_kit.monitor import (param_counts, flops_per_token, gpu_spec, detect_gpu, hardware, ThroughputMeter, CostTracker,
                                estimate, format_estimate, memory_estimate, run_length, StabilityMonitor, MetricsLogger,
                                read_metrics, gpu_memory_gb)


# ---------------------------------------------------------------- FLOPs

@pytest.mark.parametrize('preset', list(MODEL_PRESETS))
@pytest.mark.parametrize('tie', [True, False])
def test_param_counts_match_the_model(preset, tie):
    model = pytest.importorskip('smollm_kit.model')
    m = ModelConfig(**MODEL_PRESETS[preset], tie_embeddings=tie)
    with torch.device('meta'): net = model.SmolLM(m)
    pc = param_counts(m)
    assert {k: pc[k] for k in ('total', 'embedding', 'non_embedding')} == model.count_params(m)
    assert pc['total'] == sum(p.numel() for p in net.parameters())
    assert pc['blocks'] == sum(p.numel() for n, p in net.named_parameters() if n.startswith('layers.') and p.ndim == 2)
    assert pc['non_embedding'] == sum(p.numel() for n, p in net.named_parameters() if n not in ('embed_tokens.weight', 'lm_head.weight'))
    assert pc['lm_head'] == net.lm_head.weight.numel() and pc['embedding'] == (1 if tie else 2) * net.embed_tokens.weight.numel()


def test_flops_per_token_is_6n_plus_attention_counted_on_the_model():
    "6 FLOPs per weight of every matmul a token goes through (blocks + lm_head), plus 12·L·d·T for attention."
    model = pytest.importorskip('smollm_kit.model')
    m = load_config('pretrain').model
    with torch.device('meta'): net = model.SmolLM(m)
    matmul_weights = sum(p.numel() for n, p in net.named_parameters() if n.startswith('layers.') and p.ndim == 2)
    f = flops_per_token(m, 2048)
    assert f == 6 * (matmul_weights + net.lm_head.weight.numel()) + 12 * m.n_layers * m.d_model * 2048
    assert flops_per_token(m, 4096) - f == 12 * m.n_layers * m.d_model * 2048  # attention grows linearly with context
    assert flops_per_token(m) == flops_per_token(m, m.max_seq_len)  # default: max_seq_len


def test_tying_does_not_change_flops():
    m = ModelConfig(**MODEL_PRESETS['smollm-135m'])
    assert flops_per_token(m) == flops_per_token(ModelConfig(**MODEL_PRESETS['smollm-135m'], tie_embeddings=False))


# ---------------------------------------------------------------- GPUs

@pytest.mark.parametrize('name,label,peak', [
    ('Tesla T4', 'T4', 65), ('NVIDIA L4', 'L4', 121), ('NVIDIA A10G', 'A10G', 70), ('NVIDIA A100-SXM4-80GB', 'A100', 312),
    ('NVIDIA A100-PCIE-40GB', 'A100', 312), ('NVIDIA H100 80GB HBM3', 'H100 SXM', 989), ('NVIDIA H100 PCIe', 'H100 PCIe', 756),
    ('NVIDIA H200', 'H200', 989), ('NVIDIA GeForce RTX 4090', 'RTX 4090', 165), ('Tesla V100-SXM2-16GB', 'V100', 125),
    ('NVIDIA L40S', 'L40S', 362), ('NVIDIA A10', 'A10', 125)])
def test_gpu_table(name, label, peak):
    s = gpu_spec(name)
    assert (s['label'], s['peak_tflops']) == (label, peak)
    assert s['usd_per_hour'] > 0


def test_gpu_memory_from_name():
    assert gpu_spec('NVIDIA A100-PCIE-40GB')['memory_gb'] == 40 and gpu_spec('NVIDIA A100-SXM4-80GB')['memory_gb'] == 80


def fake_cuda(monkeypatch, name, major, minor, mem=16e9):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda i: types.SimpleNamespace(name=name, total_memory=mem, major=major, minor=minor))


def test_detect_gpu_bf16_native_by_capability(monkeypatch):
    fake_cuda(monkeypatch, 'Tesla T4', 7, 5, 15.8e9)
    g = detect_gpu()
    assert g['bf16_native'] is False and g['capability'] == (7, 5) and g['memory_gb'] == pytest.approx(15.8e9 / 2**30)
    hw = hardware(CostConfig())
    assert hw['peak_tflops'] == 65 and hw['usd_per_hour'] == 0.35 and hw['price_source'] == 'on-demand price table'
    fake_cuda(monkeypatch, 'NVIDIA A100-SXM4-40GB', 8, 0)
    assert detect_gpu()['bf16_native'] is True


def test_colab_prices(monkeypatch):
    fake_cuda(monkeypatch, 'NVIDIA L4', 8, 9)
    monkeypatch.setenv('COLAB_RELEASE_TAG', 'release-colab_20250101')
    hw = hardware(CostConfig())
    assert hw['usd_per_hour'] == 0.48 and hw['price_source'] == 'Colab price table'


def test_detect_cpu():
    if torch.cuda.is_available(): pytest.skip('CUDA present')
    g = detect_gpu()
    assert g['cuda'] is False and g['name'].startswith('CPU') and g['bf16_native'] is False
    hw = hardware(CostConfig())
    assert hw['peak_tflops'] is None and hw['usd_per_hour'] == 0.0 and 'unknown' in hw['price_source']


def test_hardware_overrides_and_world_size():
    hw = hardware(CostConfig(gpu_name='H100 PCIe'), world_size=4)
    assert (hw['peak_tflops'], hw['usd_per_hour'], hw['label']) == (756, 10.0, 'H100 PCIe')
    hw = hardware(CostConfig(gpu_name='H100 PCIe', peak_tflops=700, usd_per_hour=7.5), world_size=4)
    assert (hw['peak_tflops'], hw['usd_per_hour'], hw['price_source']) == (700, 7.5, 'cost.usd_per_hour')


# ---------------------------------------------------------------- throughput and cost

def test_throughput_window_and_mfu():
    tm = ThroughputMeter(flops_per_token=1e9, peak_flops=100e12, window=4)
    for _ in range(4): r = tm.update(40_000, seconds=1.0)
    assert r == {'perf/tokens_per_sec': 40_000, 'perf/mfu': pytest.approx(0.4)}
    for _ in range(4): r = tm.update(20_000, seconds=1.0)  # the window forgets the faster steps
    assert r['perf/tokens_per_sec'] == 20_000
    assert 'perf/mfu' not in ThroughputMeter(1e9).update(10, seconds=1)  # unknown peak: no MFU


def test_throughput_wall_clock():
    tm = ThroughputMeter(1e9, 1e15)
    assert tm.update(1000) == {}  # first call only starts the clock
    tm.reset(); time.sleep(0.05)
    r = tm.update(1000)
    assert 1000 / 0.2 < r['perf/tokens_per_sec'] < 1000 / 0.05 * 1.01


def test_cost_tracker_resume_and_metrics():
    ct = CostTracker(usd_per_hour=3.6, total_tokens=1_000_000)
    ct.update(0, seconds=0)
    r = ct.update(100_000, seconds=1000)
    assert r['cost/usd_spent'] == pytest.approx(1.0) and r['cost/tokens_per_dollar'] == pytest.approx(100_000)
    assert r['cost/eta_hours'] == pytest.approx(900_000 / 100 / 3600)  # session average: 100 tok/s
    sd = json.loads(json.dumps(ct.state_dict()))  # primitives only
    ct2 = CostTracker(usd_per_hour=3.6, total_tokens=1_000_000)
    ct2.load_state_dict(sd)
    r2 = ct2.update(200_000, seconds=1000, tokens_per_sec=200)
    assert ct2.elapsed_s == 2000 and r2['cost/usd_spent'] == pytest.approx(2.0)
    assert r2['cost/eta_hours'] == pytest.approx(800_000 / 200 / 3600)
    assert r2['cost/tokens_per_dollar'] == pytest.approx(100_000)


def test_cost_tracker_free_machine_and_wall_clock():
    ct = CostTracker(usd_per_hour=0.0)
    time.sleep(0.02)
    r = ct.update(10)
    assert r == {'cost/usd_spent': 0.0} and ct.elapsed_s >= 0.02  # charged from construction; no budget → no ETA


# ---------------------------------------------------------------- estimate

def test_estimate_reproduces_recipe_cost():
    cfg = load_config('pretrain', {'cost.gpu_name': 'A100'})
    e = estimate(cfg, mfu=0.6)
    t = cfg.train
    assert e['tokens_per_step'] == t.micro_batch_size * t.grad_accum_steps * t.seq_len
    assert e['total_steps'] == math.ceil(t.max_tokens / e['tokens_per_step'])
    tokens_per_sec = 0.6 * 312e12 / flops_per_token(cfg.model, t.seq_len)  # an A100's peak at 60% MFU
    assert e['tokens_per_sec'] == pytest.approx(tokens_per_sec, rel=1e-9)
    assert e['eta_hours'] == pytest.approx(e['total_tokens'] / tokens_per_sec / 3600, rel=1e-9)
    assert e['cost_usd'] == pytest.approx(e['eta_hours'] * e['usd_per_hour'], rel=1e-9)
    assert e['params'] == param_counts(cfg.model)['total']
    e8 = estimate(load_config('pretrain', {'cost.gpu_name': 'A100'}), world_size=8, mfu=0.6)
    assert e8['tokens_per_step'] == 8 * e['tokens_per_step'] and e8['eta_hours'] == pytest.approx(e['eta_hours'] / 8, rel=1e-3)
    assert e8['cost_usd'] == pytest.approx(e['cost_usd'], rel=1e-3)  # 8 GPUs, an eighth of the time
    txt = format_estimate(e)
    for s in (f"{e['params']/1e6:.2f}M params", f"{e['flops_per_token']/1e9:.3g} GFLOP/token", f"{e['total_steps']:,} steps",
              '60% MFU', f"${e['usd_per_hour']:.2f}/h", 'fits'):
        assert s in txt, s


def test_estimate_memory_fit():
    cfg = load_config('pretrain', {'cost.gpu_name': 'NVIDIA H100 80GB HBM3'})
    assert estimate(cfg)['fits'] is True
    cfg.train.activation_checkpointing = False
    e = estimate(cfg)
    assert e['fits'] is False and 'DOES NOT FIT' in format_estimate(e)
    m = memory_estimate(cfg)
    assert m['activations'] > 10 * m['activations_checkpointed'] - 60
    assert m['weights'] == pytest.approx(param_counts(cfg.model)['total'] * 4 / 2**30)
    t4 = load_config('pretrain-135m', {'cost.gpu_name': 'Tesla T4'})
    assert estimate(t4)['fits'] is True  # the preset sized for a free T4


def test_estimate_on_cpu_without_peak():
    e = estimate(load_config('tiny'), gpu=dict(name='CPU (2 cores)', cuda=False, count=0, memory_gb=8.0, capability=None, bf16_native=False))
    assert e['tokens_per_sec'] is None and e['eta_hours'] is None and e['cost_usd'] is None and e['fits'] is True
    assert 'n/a' in format_estimate(e)
    assert e['memory']['activations'] == pytest.approx(2 * memory_estimate(load_config('tiny'))['activations'])  # fp32 on CPU


def test_run_length():
    t = load_config('tiny').train
    assert run_length(t) == (150, 150 * t.tokens_per_step())
    t.max_tokens = 10 * t.tokens_per_step() + 1
    assert run_length(t)[0] == 11  # whichever ends first
    t.max_steps = 5
    assert run_length(t)[0] == 5


# ---------------------------------------------------------------- stability

def noisy_curve(seed, n=1000, noise=0.03):
    rng = random.Random(seed)
    for i in range(n):
        base = 2.2 + 8 * math.exp(-i / 80) + 0.3 * math.exp(-i / 400)
        yield i, base * (1 + rng.gauss(0, noise)), 0.5 + 4 * math.exp(-i / 50) + abs(rng.gauss(0, 0.08))


def test_no_false_positives_on_normal_training():
    cfg = load_config('tiny').stability
    for seed in range(20):
        sm = StabilityMonitor(cfg)
        ev = [e for i, l, g in noisy_curve(seed) for e in sm.check(i, l, g)]
        assert ev == [], (seed, ev[:3])


def test_injected_spikes_and_nans():
    cfg = StabilityConfig(window=100, min_history=20, loss_z=6, grad_norm_z=10, action='skip')
    sm = StabilityMonitor(cfg)
    got = []
    for i, l, g in noisy_curve(0):
        if i in (300, 301, 650): l += 1.5          # two spikes in a row, then one later
        if i == 500: g *= 20                      # grad-norm anomaly alone
        if i == 700: l = float('nan')
        if i == 800: g = float('inf')
        got += [(e['event'], e['step'], e['metric'], e['action']) for e in sm.check(i, l, g)]
    assert got == [('spike', 300, 'train/loss', 'skip'), ('spike', 301, 'train/loss', 'skip'),
                   ('spike', 500, 'train/grad_norm', 'skip'), ('spike', 650, 'train/loss', 'skip'),
                   ('nan', 700, 'train/loss', 'skip'), ('nan', 800, 'train/grad_norm', 'skip')]
    assert sm.counts == {'spike': 4, 'nan': 2}
    assert all(math.isfinite(v) for v in sm.hist['train/loss']) and max(list(sm.hist['train/loss'])[-50:]) < 2.6


def test_nan_is_skip_even_when_action_is_rollback():
    sm = StabilityMonitor(StabilityConfig(action='rollback'))
    assert sm.check(0, torch.tensor(float('nan')), 1.0) == [
        {'event': 'nan', 'step': 0, 'metric': 'train/loss', 'value': 'nan', 'action': 'skip'}]
    assert len(sm.hist['train/loss']) == 0


def test_spike_event_fields_and_min_history():
    sm = StabilityMonitor(StabilityConfig(window=50, min_history=10, loss_z=6, action='rollback'))
    rng = random.Random(1)
    assert sm.check(0, 3.0) == []
    assert all(sm.check(i, 3 + rng.gauss(0, 0.01) + (5 if i == 5 else 0)) == [] for i in range(1, 10))  # too early to judge
    ev = sm.check(10, 4.0)
    assert len(ev) == 1 and ev[0]['event'] == 'spike' and ev[0]['metric'] == 'train/loss' and ev[0]['action'] == 'rollback'
    assert ev[0]['value'] == 4.0 and ev[0]['z'] > 6 and 2.9 < ev[0]['median'] < 3.1


def test_level_shift_is_absorbed():
    sm = StabilityMonitor(StabilityConfig(window=100, min_history=20, loss_z=6))
    rng = random.Random(2)
    steps = [i for i in range(600) for e in sm.check(i, (3.0 if i < 200 else 3.5) + rng.gauss(0, 0.02))]
    assert steps and steps[0] == 200 and steps[-1] < 200 + 100  # alarms stop within a window


def test_stability_state_round_trip():
    cfg = load_config('tiny').stability
    a = StabilityMonitor(cfg)
    curve = list(noisy_curve(3, n=400))
    for i, l, g in curve[:200]: a.check(i, l, g)
    b = StabilityMonitor(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for i, l, g in curve[200:]:
        l = l + (2.0 if i == 350 else 0)
        assert a.check(i, l, g) == b.check(i, l, g)
    assert a.state_dict() == b.state_dict() and a.counts['spike'] == 1


# ---------------------------------------------------------------- sinks

def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_metrics_logger_jsonl(tmp_path):
    with MetricsLogger(tmp_path) as ml:
        ml.log({'step': 1, 'tokens': 10, 'train/loss': torch.tensor(2.5), 'train/lr': float('inf')})
        ml.event('spike', step=1, metric='train/loss', value=9.0)
        assert len(lines(tmp_path/'metrics.jsonl')) == 2  # flushed line by line, before close
    with MetricsLogger(tmp_path) as ml:  # append, never truncate
        ml.log({'step': 2, 'tokens': 20, 'train/loss': 2.0})
    assert lines(tmp_path/'metrics.jsonl') == [
        {'step': 1, 'tokens': 10, 'train/loss': 2.5, 'train/lr': None},
        {'event': 'spike', 'step': 1, 'metric': 'train/loss', 'value': 9.0},
        {'step': 2, 'tokens': 20, 'train/loss': 2.0}]


def test_only_rank0_writes(tmp_path):
    with MetricsLogger(tmp_path/'r', rank=1, use_wandb=True) as ml:
        ml.log({'step': 1, 'train/loss': 1.0}); ml.event('resume', 1)
    assert not (tmp_path/'r').exists()


@pytest.fixture
def wandb_sandbox(tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    home = tmp_path/'home'; home.mkdir()
    for k in ('WANDB_API_KEY', 'WANDB_BASE_URL', 'WANDB_ENTITY', 'WANDB_PROJECT', 'WANDB_RUN_ID', 'WANDB_RESUME'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('HOME', str(home)); monkeypatch.setenv('NETRC', str(home/'.netrc'))
    for k in ('WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR', 'WANDB_ARTIFACT_DIR'): monkeypatch.setenv(k, str(home/k.lower()))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    return tmp_path/'run'


def test_wandb_offline(wandb_sandbox, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        ml = MetricsLogger(wandb_sandbox, use_wandb=True, wandb_project='t', run_name='r', config={'a': 1})
        assert ml.wandb is not None
        for s in (1, 2): ml.log({'step': s, 'train/loss': 1.0 / s, 'note': 'x'})
        ml.close()
    run_id = (wandb_sandbox/'wandb_id').read_text()
    assert list((wandb_sandbox/'wandb').glob(f'offline-run-*-{run_id}'))
    ml = MetricsLogger(wandb_sandbox, use_wandb=True, wandb_project='t')  # a resumed run keeps its W&B id
    ml.log({'step': 3, 'train/loss': 0.3}); ml.close()
    assert (wandb_sandbox/'wandb_id').read_text() == run_id
    assert [r['step'] for r in lines(wandb_sandbox/'metrics.jsonl')] == [1, 2, 3]


def test_wandb_disabled_mode(wandb_sandbox, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        with MetricsLogger(wandb_sandbox, use_wandb=True) as ml: ml.log({'step': 1, 'train/loss': 1.0})
    assert len(lines(wandb_sandbox/'metrics.jsonl')) == 1


def test_wandb_not_logged_in_warns_once_and_continues(wandb_sandbox, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'online')
    with pytest.warns(RuntimeWarning, match='not logged in') as rec:
        with MetricsLogger(wandb_sandbox, use_wandb=True) as ml:
            assert ml.wandb is None
            for s in range(3): ml.log({'step': s, 'train/loss': 1.0})
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert len(lines(wandb_sandbox/'metrics.jsonl')) == 3


def test_wandb_failure_midrun_warns_once(tmp_path):
    class Broken:
        calls = 0
        def log(self, *a, **k): Broken.calls += 1; raise ConnectionError('network down\nmore')
        def finish(self): raise AssertionError('finish must not be called once disabled')
    ml = MetricsLogger(tmp_path)
    ml.wandb = Broken()
    with pytest.warns(RuntimeWarning, match='ConnectionError: network down') as rec:
        for s in range(3): ml.log({'step': s, 'train/loss': 1.0})
    ml.close()
    assert Broken.calls == 1 and len(rec) == 1 and len(lines(tmp_path/'metrics.jsonl')) == 3


def test_wandb_skips_steps_it_has_seen(tmp_path):
    class Rec:
        def __init__(self): self.steps = []
        def log(self, d, step): self.steps.append(step)
        def finish(self): pass
    ml = MetricsLogger(tmp_path)
    ml.wandb = r = Rec()
    for s in (1, 2, 2, 3, 2, 3, 4): ml.log({'step': s, 'x': 1.0})
    ml.event('resume', 2)
    assert r.steps == [1, 2, 2, 3, 3, 4]  # the backwards 2 stays in metrics.jsonl only
    assert len(lines(tmp_path/'metrics.jsonl')) == 8


def test_read_metrics_resume_and_merge(tmp_path):
    p = tmp_path/'metrics.jsonl'
    recs = [{'step': s, 'tokens': s*10, 'train/loss': 5 - s*0.1} for s in range(1, 8)]
    recs.insert(5, {'step': 5, 'val/loss': 4.0})                           # a val line for step 5
    recs += [{'event': 'resume', 'step': 4}]                               # crashed after 7, resumed from step 4
    recs += [{'step': s, 'tokens': s*10, 'train/loss': 9.0} for s in (5, 6)]
    p.write_text(''.join(json.dumps(r) + '\n' for r in recs) + '{"step": 7, "tok')
    out, events = read_metrics(tmp_path)
    assert [r['step'] for r in out] == [1, 2, 3, 4, 5, 6]
    assert out[4] == {'step': 5, 'tokens': 50, 'train/loss': 9.0}         # old step 5 (and its val line) replaced
    assert out[3]['train/loss'] == pytest.approx(4.6) and events == [{'event': 'resume', 'step': 4}]
    # a step going backwards without an event also starts a new timeline
    p.write_text(''.join(json.dumps({'step': s, 'x': s}) + '\n' for s in (1, 2, 3, 2, 3)))
    assert [r['x'] for r in read_metrics(p)[0]] == [1, 2, 3]


def test_read_metrics_errors(tmp_path):
    p = tmp_path/'metrics.jsonl'
    p.write_text('{"step": 1}\n{"step": 2, bad\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r'metrics\.jsonl:2 is not valid JSON'):
        read_metrics(p)
    with pytest.raises(FileNotFoundError, match='metrics: no such file'):
        read_metrics(tmp_path/'nope')


def test_gpu_memory_cpu():
    if torch.cuda.is_available(): pytest.skip('CUDA present')
    assert gpu_memory_gb() is None and gpu_memory_gb(peak=True) is None
