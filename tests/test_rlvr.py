"""RLVR: the GRPO-family loss on hand-worked numbers, advantages, verifiers (incl. failures, sandbox limits and a tiny
reward model), data parsing, the batched sampler, and the stage end to end (metrics, samples, KL, dynamic sampling,
bit-identical resume mid rollout buffer, and learning a dense reward from scratch)."""
import json, math, time, types
import pytest, torch
from smollm_kit.config import load_config, ConfigError, RLVRConfig, ModelConfig, MODEL_PRESETS
from smollm_kit.monitor import read_metrics
from smollm_kit.model import SmolLM
from smollm_kit.rlvr import (policy_loss, group_advantages, sample_rollouts, policy_logprobs, rlvr_data, pack_rows,
                             demo_problems, rlvr)
from smollm_kit import verifiers as V

# -- verifiers used by the stage tests through the 'module:function' protocol (this file is importable as test_rlvr)
def digit_share(prompt, completion, example):
    "Dense reward a fresh model can climb: the share of non-space characters that are digits."
    s = completion.replace(' ', '')
    return sum(c.isdigit() for c in s) / max(len(s), 1)

def always_zero(prompt, completion, example): return 0.0

# ---------------------------------------------------------------------------------------------------------------
# the loss, worked by hand
def _on_policy(lp, A, mask, lt, L):
    s, n, m = policy_loss(lp, lp.detach(), A, mask, lt, 0.2, 0.28, L)
    return float(s) / n

def test_loss_types_on_hand_worked_example():
    # group of 3, lengths 3, 1, 2; rewards (1, 0, 0) with advantage 'none' -> A = (2/3, -1/3, -1/3); rho = 1, so each
    # token's loss is -A. Token losses: c0: 3 x -2/3, c1: 1 x 1/3, c2: 2 x 1/3.
    A = group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3, 'none')
    assert A.tolist() == pytest.approx([2/3, -1/3, -1/3])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    lp = torch.full((3, 3), -1.0) * mask
    # grpo: per-completion token means -2/3, 1/3, 1/3 -> mean 0
    assert _on_policy(lp, A, mask, 'grpo', 4) == pytest.approx(0.0, abs=1e-7)
    # dapo: (-2 + 1/3 + 2/3) / 6 tokens = -1/6
    assert _on_policy(lp, A, mask, 'dapo', 4) == pytest.approx(-1/6)
    # dr_grpo: (-2 + 1/3 + 2/3) / (3 completions x L=4) = -1/12
    assert _on_policy(lp, A, mask, 'dr_grpo', 4) == pytest.approx(-1/12)

def test_loss_gradient_is_minus_advantage_on_policy_and_zero_when_clipped():
    mask = torch.ones(1, 2, dtype=torch.bool)
    new = torch.log(torch.tensor([[0.3, 0.5]])).requires_grad_()
    old = torch.log(torch.tensor([[0.3, 0.25]]))           # token 0: rho 1; token 1: rho 2 > 1.28
    s, n, m = policy_loss(new, old, torch.tensor([0.5]), mask, 'dapo', 0.2, 0.28)
    # loss = -(1 * 0.5) - (1.28 * 0.5) = -1.14; d/dlogp: token 0 -> -A*rho = -0.5, token 1 clipped -> 0
    assert s.item() == pytest.approx(-1.14) and n == 2
    s.backward()
    assert new.grad[0].tolist() == pytest.approx([-0.5, 0.0])
    assert float(m['clipped_ratio'][0]) / float(m['clipped_ratio'][1]) == pytest.approx(0.5)

def test_negative_advantage_clipped_below_and_pessimistic_above():
    mask = torch.ones(2, 1, dtype=torch.bool)
    new = torch.log(torch.tensor([[0.1], [0.9]]))
    old = torch.log(torch.tensor([[0.2], [0.6]]))            # rho 0.5 (< 0.8) and 1.5 (> 1.28)
    s, n, m = policy_loss(new, old, torch.tensor([-2.0, -2.0]), mask, 'grpo', 0.2, 0.28)
    # c0: -min(0.5 * -2, 0.8 * -2) = 1.6 (clipped); c1: -min(1.5 * -2, 1.28 * -2) = 3.0 (unclipped); grpo sums seq means
    assert float(s) == pytest.approx(4.6) and n == 2
    assert float(m['clipped_ratio'][0]) == 1.0

def test_k3_kl_term():
    lp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    s, n, m = policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), 'dapo', beta=0.5, ref_logps=ref)
    k = lambda p, q: q / p - math.log(q / p) - 1               # k3 with r = log q - log p
    want = k(0.5, 0.25) + k(0.2, 0.4)
    assert float(m['kl'][0]) == pytest.approx(want, rel=1e-5) and float(s) / n == pytest.approx(0.5 * want / 2, rel=1e-5)

def test_advantage_scalings_by_hand():
    r = torch.tensor([3.0, 1.0, 2.0, 2.0])                     # two groups of 2: means 2 and 2
    # group: std of (3, 1) = sqrt(2), of (2, 2) = 0
    assert group_advantages(r, 2, 'group').tolist() == pytest.approx([1 / (math.sqrt(2) + 1e-4), -1 / (math.sqrt(2) + 1e-4), 0, 0])
    sb = math.sqrt(2 / 3)                                       # unbiased std of (3, 1, 2, 2): sum of squares 2 over 3
    assert group_advantages(r, 2, 'batch').tolist() == pytest.approx([1 / (sb + 1e-4), -1 / (sb + 1e-4), 0, 0])
    assert group_advantages(r, 2, 'none').tolist() == [1.0, -1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match='rlvr.scale_rewards|rlvr.advantage|expected'): group_advantages(r, 2, 'rank')

def test_micro_batch_split_matches_whole_batch_for_every_loss_type():
    torch.manual_seed(0)
    lp, old = -torch.rand(4, 5), -torch.rand(4, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    A = torch.tensor([1.0, -0.5, 0.3, -0.8])
    for lt in ('grpo', 'dapo', 'dr_grpo'):
        s, n, _ = policy_loss(lp, old, A, mask, lt, 0.2, 0.28, 5)
        parts = [policy_loss(lp[i:i+2], old[i:i+2], A[i:i+2], mask[i:i+2], lt, 0.2, 0.28, 5) for i in (0, 2)]
        assert float(sum(p[0] for p in parts)) / sum(p[1] for p in parts) == pytest.approx(float(s) / n, rel=1e-6)

# ---------------------------------------------------------------------------------------------------------------
# verifiers
def test_math_fallback_without_math_verify(monkeypatch):
    monkeypatch.setattr(V, '_math_verify', lambda: None)
    ex = {'answer': 'She pays 3 * 4 = 12 dollars.\n#### 1,012'}
    assert V.math_reward('', 'so 1012 in total. The answer is 1012.', ex) == 1.0
    assert V.math_reward('', r'\boxed{1012}', ex) == 1.0
    assert V.math_reward('', 'The answer is 1013.', ex) == 0.0
    assert V.math_reward('', 'I do not know', ex) == 0.0

def test_math_verify_is_called_with_signal_timeouts_disabled(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(parse=lambda s, **kw: calls.append(('parse', kw)) or [s],
                                 verify=lambda g, p, **kw: calls.append(('verify', kw)) or True)
    monkeypatch.setattr(V, '_math_verify', lambda: fake)
    assert V.math_reward('', r'$\frac{1}{2}$', {'answer': '0.5'}) == 1.0   # not a plain-number match: math-verify decides
    assert calls and all(kw.get('parsing_timeout', 'x') is None for k, kw in calls if k == 'parse')
    assert [kw.get('timeout_seconds', 'x') for k, kw in calls if k == 'verify'] == [None]

def test_reward_counts_failures_and_timeouts_without_crashing():
    def boom(p, c, e): raise ZeroDivisionError('x')
    def hang(p, c, e): time.sleep(3); return 1.0
    def nan(p, c, e): return float('nan')
    r = V.Reward([boom, hang, nan, V.exact_reward], [1, 1, 1, 2], ['boom', 'hang', 'nan', 'exact'], timeout=0.2, max_warnings=0)
    tot, parts = r(['q', 'q'], ['5', '6'], [{'answer': 5}, {'answer': 5}])
    assert tot == [2.0, 0.0] and parts[0] == [0.0, 0.0, 0.0, 1.0]
    assert (r.errors, r.timeouts) == (4, 2)

def test_python_tests_sandbox_limits():
    row = {'tests': 'assert sq(3) == 9'}
    f = V.python_tests_reward(timeout=3, memory_mb=200)
    assert f('', '```python\ndef sq(x): return x * x\n```', row) == 1.0
    assert f('', '```python\ndef sq(x): return x + x\n```', row) == 0.0
    assert f('', '```python\nimport os\nbig = b"x" * (400 * 2**20)\ndef sq(x): return x * x\n```', row) == 0.0  # over 200 MiB
    t = time.monotonic(); assert f('', 'while True: pass', row) == 0.0; assert time.monotonic() - t < 30

def test_regex_and_length_penalty():
    fmt = V.regex_reward()
    assert fmt('', '2 + 2 = 4. The answer is 4.', {}) == 1.0 and fmt('', 'The answer is four.', {}) == 0.0
    lp = V.length_penalty(cache=10)                             # L_max 30: free to 20, then -0.1 per token
    assert [lp('', '', {'completion_len': n, 'max_completion_length': 30}) for n in (20, 25, 30)] == pytest.approx([0, -0.5, -1])

def test_reward_model_verifier_on_tiny_random_hf_model(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(['[PAD]', '[UNK]'] + 'what is 1 2 3 + = ? the answer'.split())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]')); tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='[PAD]', unk_token='[UNK]').save_pretrained(tmp_path)
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)).save_pretrained(tmp_path)
    cfg = RLVRConfig(verifier='reward_model', reward_model=str(tmp_path))
    r = V.build_reward(cfg)
    a, b = r(['what is 1 + 2 ? '] * 2, ['the answer is 3', 'the answer is 2'], [{}, {}])[0]
    assert math.isfinite(a) and math.isfinite(b) and a != b
    with pytest.raises(ConfigError, match='rlvr.verifier'): V.build_reward(RLVRConfig(verifier='reward_model'))

def test_bad_verifier_names_are_one_line_config_errors():
    for spec, msg in (('mth', "unknown verifier 'mth'"), ('no_such_module_xyz:f', 'cannot load'), ('json:no_such_fn', 'cannot load')):
        with pytest.raises(ConfigError, match='^rlvr.verifier: ') as e:
            load_config('rlvr-tiny', {'rlvr.verifier': spec})
        assert msg in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(ConfigError, match='rlvr.num_generations'): load_config('rlvr-tiny', {'rlvr.num_generations': 3})
    with pytest.raises(ConfigError, match='rlvr.verifier_weights'): load_config('rlvr-tiny', {'rlvr.verifier': 'math,regex', 'rlvr.verifier_weights': [1.0]})

# ---------------------------------------------------------------------------------------------------------------
# data
def test_gsm8k_format_local_file_and_hub_call(tmp_path, monkeypatch):
    rows = [{'question': f'Q{i}: what is {i} + {i}?', 'answer': f'{i} + {i} = {2*i}\n#### {2*i}'} for i in range(12)]
    p = tmp_path/'gsm8k.jsonl'; p.write_text('\n'.join(json.dumps(r) for r in rows))
    tr, va = rlvr_data(RLVRConfig(dataset=str(p), val_examples=2))
    assert [r['prompt'] for r in va] == ['Q10: what is 10 + 10?', 'Q11: what is 11 + 11?'] and len(tr) == 10
    assert V.math_reward(va[0]['prompt'], 'The answer is 20.', va[0]) == 1.0
    (tmp_path/'bad.jsonl').write_text(json.dumps({'text': 'x', 'answer': 1}))
    with pytest.raises(ValueError, match="no 'prompt' column"): rlvr_data(RLVRConfig(dataset=str(tmp_path/'bad.jsonl'), val_examples=0))
    import datasets
    seen = []
    def fake_load(name, config=None, split=None, **kw):
        seen.append((name, config, split)); return rows[:3] if split == 'test' else rows
    monkeypatch.setattr(datasets, 'load_dataset', fake_load)
    tr, va = rlvr_data(RLVRConfig(dataset='gsm8k', val_split='test', val_examples=64))
    assert seen == [('openai/gsm8k', 'main', 'train'), ('openai/gsm8k', 'main', 'test')] and len(va) == 3

def test_demo_split_is_held_out_and_answers_are_right():
    tr, va = demo_problems(500, 50, seed=3)
    assert not {r['prompt'] for r in tr} & {r['prompt'] for r in va}
    for r in tr[:50]:
        a, op, b = r['prompt'][len('What is '):-1].split()
        assert int(r['answer']) == {'+': int(a) + int(b), '-': int(a) - int(b), '×': int(a) * int(b)}[op]

# ---------------------------------------------------------------------------------------------------------------
# the sampler
@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return SmolLM(ModelConfig(**{**MODEL_PRESETS['tiny'], 'vocab_size': 96, 'max_seq_len': 64})).eval()

@pytest.mark.parametrize('T', [1.0, 0.7])
def test_sampler_logprobs_match_the_loss_logprobs(tiny_model, T):
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    ro = sample_rollouts(tiny_model, prompts, 3, max_new_tokens=8, temperature=T, generator=torch.Generator().manual_seed(0))
    comps = [ro.tokens[i, :int(ro.lengths[i])].tolist() for i in range(6)]
    mbs = pack_rows([prompts[i // 3] for i in range(6)], comps, list(ro.logps), torch.zeros(6), 6)
    b = mbs[0]
    lp, _ = policy_logprobs(tiny_model, b['input_ids'], b['targets'], T)
    m = b['targets'] != -100
    assert torch.allclose(lp[m], b['old_logps'][m], atol=1e-4)

def test_sampler_stops_on_device_and_reports_truncation(tiny_model):
    g = lambda: torch.Generator().manual_seed(5)
    free = sample_rollouts(tiny_model, [[3, 4]], 4, max_new_tokens=10, generator=g())
    assert free.truncated.all() and (free.lengths == 10).all()
    stop = int(free.tokens[0, 2])                               # the third token of row 0 becomes a stop token
    ro = sample_rollouts(tiny_model, [[3, 4]], 4, max_new_tokens=10, generator=g(), stop_ids=[stop], sync_every=3)
    first = free.tokens[0].tolist().index(stop)
    assert int(ro.lengths[0]) == first + 1 and not ro.truncated[0]
    assert ro.tokens[0, :first + 1].tolist() == free.tokens[0, :first + 1].tolist()
    assert (ro.logps[0, first + 1:] == 0).all() and (ro.entropy[0, first + 1:] == 0).all()

# ---------------------------------------------------------------------------------------------------------------
# the stage, end to end
def _cfg(d, **over):
    base = {'run.run_dir': str(d), 'logging.progress': False, 'logging.every_steps': 1, 'train.max_steps': 4,
            'train.micro_batch_size': 4, 'train.grad_accum_steps': 2, 'train.eval_every': 0,
            'rlvr.max_completion_length': 12, 'rlvr.val_examples': 4, 'rlvr.num_generations': 4,
            'rlvr.verifier': 'test_rlvr:digit_share', 'optim.adamw_lr': 3e-3, 'checkpoint.every_steps': None,
            'rlvr.demo_max_operand': 20}   # the prompts these small runs were written for
    return load_config('rlvr-tiny', {**base, **over})

RLVR_KEYS = ['train/reward', 'train/reward_std', 'train/frac_reward_zero_std', 'train/completion_len', 'train/truncated_frac',
             'train/clipped_ratio', 'train/entropy', 'train/loss', 'train/grad_norm']

def test_stage_logs_documented_metrics_samples_and_eval(tmp_path):
    cfg = _cfg(tmp_path, **{'train.max_steps': 2, 'train.eval_every': 2, 'rlvr.samples_every': 1, 'rlvr.samples_count': 2,
                            'rlvr.verifier': 'math,test_rlvr:digit_share', 'rlvr.verifier_weights': [1.0, 0.5]})
    res = rlvr(cfg)
    recs, _ = read_metrics(res.run_dir)
    steps = [r for r in recs if r.get('step', 0) >= 1 and 'train/loss' in r]
    assert len(steps) == 2 and all(k in steps[-1] for k in RLVR_KEYS), steps[-1].keys()
    assert 'train/reward/math' in steps[-1] and 'train/reward/test_rlvr:digit_share' in steps[-1]
    assert 'train/kl' not in steps[-1]                                          # beta = 0: no reference model
    assert [r['step'] for r in recs if 'val/pass@1' in r] == [0, 2] and 'val/reward' in recs[-1]
    s = [json.loads(l) for l in open(tmp_path/'samples.jsonl')]
    assert [x['step'] for x in s] == [1, 1, 2, 2] and {'prompt', 'completion', 'reward', 'answer'} <= set(s[0])
    assert s[0]['prompt'].startswith('What is ')
    assert res.metrics['train/truncated_frac'] >= 0 and 0 <= res.metrics['train/frac_reward_zero_std'] <= 1

def test_kl_to_frozen_reference_starts_at_zero(tmp_path):
    res = rlvr(_cfg(tmp_path, **{'train.max_steps': 3, 'rlvr.beta': 0.1}))
    recs, _ = read_metrics(res.run_dir)
    kl = [r['train/kl'] for r in recs if 'train/kl' in r]
    assert len(kl) == 3 and kl[0] == pytest.approx(0, abs=1e-6) and kl[-1] > 0  # the policy moves away from the reference

def test_dynamic_sampling_keeps_sampling_when_no_group_has_spread(tmp_path):
    res = rlvr(_cfg(tmp_path, **{'train.max_steps': 1, 'rlvr.verifier': 'test_rlvr:always_zero', 'rlvr.dynamic_sampling': True,
                                 'rlvr.dynamic_sampling_rounds': 3}))
    last = read_metrics(res.run_dir)[0][-1]
    assert last['train/rollout_rounds'] == 3 and last['train/frac_reward_zero_std'] == 1.0 and last['train/loss'] == 0.0

def _per_step(run_dir):
    recs, _ = read_metrics(run_dir)
    out = {}
    for r in recs:
        if 'train/loss' in r: out[r['step']] = (r['train/loss'], r['train/grad_norm'], r.get('train/reward'), r['train/clipped_ratio'])
    return out

def test_resume_mid_rollout_buffer_is_bit_identical(tmp_path):
    over = {'train.max_steps': 5, 'rlvr.updates_per_rollout': 2}
    straight = rlvr(_cfg(tmp_path/'a', **over))
    # the same run killed after step 3 — the middle of the second rollout batch (steps 3 and 4 train on it) — and resumed
    rlvr(_cfg(tmp_path/'b', **{**over, 'train.max_steps': 3}))
    resumed = rlvr(_cfg(tmp_path/'b', **over))
    assert resumed.resumed_from == 3
    a, b = _per_step(straight.run_dir), _per_step(resumed.run_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert a == b                                                  # exact equality: losses, grad norms, rewards
    assert a[4][2] is None and a[5][2] is not None                 # step 4 reused the buffer; step 5 sampled anew
    assert a[4][3] > 0 or a[4][0] != 0                             # the reused step is off-policy (ratio != 1)

def test_reward_rises_on_a_small_seeded_run(tmp_path):
    # a fresh tiny model, a dense reward (share of digits): 20 steps of 4 prompts x 4 samples
    res = rlvr(_cfg(tmp_path, **{'train.max_steps': 20, 'rlvr.val_examples': 0}))
    r = [x['train/reward'] for x in read_metrics(res.run_dir)[0] if 'train/reward' in x]
    assert len(r) == 20
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.05 and last > 1.5 * first, r

def test_epochs_budget_counts_rollout_batches():
    from smollm_kit.rlvr import RLVRStage
    from smollm_kit.data import load_tokenizer
    from smollm_kit.sft import ensure_chat_format
    cfg = load_config('rlvr-tiny', {'train.max_steps': None, 'train.epochs': 1.0, 'rlvr.updates_per_rollout': 2,
                                    'rlvr.demo_max_operand': 20, 'rlvr.val_examples': 64})
    tok = ensure_chat_format(load_tokenizer(cfg))
    st = RLVRStage(cfg, SmolLM(cfg.model), tok)
    # 610 demo problems - 64 held out = 546 prompts; 32 completions / 8 per prompt = 4 prompts per rollout batch
    assert len(st.train_rows) == 546 and st.P == 4
    assert st.budget_steps(cfg.train, 1) == math.ceil(546 / 4) * 2 and st.budget_steps(cfg.train, 2) == math.ceil(546 / 8) * 2
