import dataclasses
"""DPO/APO: the losses against TRL's DPOTrainer, preference data in every supported format, packing, the reference
log-prob cache (fingerprint, resume after a kill), and the stage end to end through the shared Trainer."""
import json, math, shutil, warnings
from pathlib import Path

import pytest, torch

from smollm_kit.config import ConfigError, DPOConfig, load_config
from smollm_kit.data import load_tokenizer
from smollm_kit.dpo import (LOSS_TYPES, Pair, PreferenceDataError, load_preference_records, pack_pairs, prepare_pairs,
                            preference_loss, sequence_logps)
from smollm_kit.model import SmolLM
from smollm_kit.sft import ensure_chat_format


def u(s): return {'role': 'user', 'content': s}
def a(s): return {'role': 'assistant', 'content': s}


@pytest.fixture(scope='module')
def tok():
    return ensure_chat_format(load_tokenizer(load_config('tiny')))


def perturbed_model(mc, seed):
    "A tiny SmolLM with random weights everywhere (norms too), so policy and reference really differ."
    torch.manual_seed(seed)
    m = SmolLM(mc)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


# ------------------------------------------------------------------------------------------- losses vs TRL
def test_losses_and_rewards_match_trl(tmp_path, tok):
    "The same tiny model (exported to HF), the same tokenised batch, fp32: TRL's loss and rewards/* equal ours."
    trl = pytest.importorskip('trl')
    from datasets import Dataset
    from transformers import SmolLM3ForCausalLM
    from smollm_kit.export import to_hf_config, to_hf_state_dict
    mc = load_config('tiny').model
    policy, ref = perturbed_model(mc, 0), perturbed_model(mc, 1)

    def hf(m):
        h = SmolLM3ForCausalLM(to_hf_config(mc, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id))
        missing, unexpected = h.load_state_dict(to_hf_state_dict(m.state_dict(), mc), strict=False)
        assert not unexpected and all('rotary' in k or k == 'lm_head.weight' for k in missing), (missing, unexpected)
        return h.eval()

    rows = [{'prompt': [u(f'What is {i} + {2 * i + 3}?')], 'chosen': [a(f'{i} + {2 * i + 3} = {3 * i + 3}. The answer is {3 * i + 3}.')],
             'rejected': [a(['No idea.', f'{3 * i + 4}', 'Maybe ten, maybe not.'][i % 3])]} for i in range(6)]
    rows.append({'prompt': 'Say hi', 'chosen': 'hi there', 'rejected': 'go away'})  # a plain-text pair too
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to='none', use_cpu=True, per_device_train_batch_size=len(rows),
                         max_length=None, bf16=False, fp16=False, disable_dropout=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        trainer = trl.DPOTrainer(model=hf(policy), ref_model=hf(ref), args=args, processing_class=tok,
                                 train_dataset=Dataset.from_list(rows[:-1]))
        plain = trainer._prepare_dataset(Dataset.from_list(rows[-1:]), tok, args, 'plain')
    examples = [trainer.train_dataset[i] for i in range(len(rows) - 1)] + [plain[0]]
    batch = trainer.data_collator(examples)
    pairs = [Pair(e['prompt_ids'], e['chosen_ids'], e['rejected_ids']) for e in examples]
    packed, n = pack_pairs(pairs, list(range(len(pairs))), 0, seq_len=256, rows=len(pairs))
    assert n == len(pairs) and (packed['doc_ids'].amax(1) >= 2).any()  # several pairs share a row
    with torch.no_grad():
        pc, pr = sequence_logps(policy, packed)
        rc, rr = sequence_logps(ref, packed)
    trainer.model.train()
    for lt in LOSS_TYPES:
        beta, eps = (0.5, 0.0) if lt == 'ipo' else (0.1, 0.2 if lt == 'robust' else 0.0)
        trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing = [lt], [1.0], beta, eps
        trainer._metrics['train'].clear()
        with torch.no_grad(): want = trainer.compute_loss(trainer.model, batch)
        got, m = preference_loss(pc, pr, rc, rr, beta, lt, label_smoothing=eps,
                                 chosen_lengths=packed['lengths'][:, 0], rejected_lengths=packed['lengths'][:, 1])
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5, msg=lambda s: f"{lt}: {s}")
        for k in ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins'):
            assert abs(m[k].item() - trainer._metrics['train'][k][-1]) <= 1e-5 * max(1, abs(m[k].item())), (lt, k)
    assert 0 < m['rewards/accuracies'] < 1  # a batch where the check means something


def test_ipo_takes_length_normalised_logps():
    "Without lengths, 'ipo' treats its inputs as already length-normalised (TRL's convention)."
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 10 for _ in range(4))
    lc, lr = torch.tensor([3., 5, 8, 1, 2]), torch.tensor([4., 4, 2, 6, 9])
    a_, _ = preference_loss(pc, pr, rc, rr, 0.3, 'ipo', chosen_lengths=lc, rejected_lengths=lr)
    b_, _ = preference_loss(pc / lc, pr / lr, rc / lc, rr / lr, 0.3, 'ipo')
    torch.testing.assert_close(a_, b_)


def test_unknown_loss_type_is_a_clear_error():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type: expected one of"): preference_loss(z, z, z, z, 0.1, 'kto')


# ------------------------------------------------------------------------------------------- data formats
def write_jsonl(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


TRL_LIB = [{'chosen': [u(f'q{i}'), a(f'good {i}')], 'rejected': [u(f'q{i}'), a(f'bad {i}')], 'score_chosen': 8.0,
            'score_rejected': 2.0} for i in range(12)]
H4 = [{'prompt': f'q{i}', 'prompt_id': str(i), 'chosen': [u(f'q{i}'), a(f'good {i}')], 'rejected': [u(f'q{i}'), a(f'bad {i}')],
       'messages': [u(f'q{i}'), a(f'good {i}')], 'score_chosen': 8.0, 'score_rejected': 2.0} for i in range(12)]
SMOLTALK2 = [{'prompt': f'q{i}', 'chosen': [a(f'good {i}')], 'rejected': [a(f'bad {i}')],
              'chat_template_kwargs': {'enable_thinking': False}} for i in range(12)]


@pytest.mark.parametrize('rows', [TRL_LIB, H4, SMOLTALK2], ids=['trl-lib', 'H4', 'smoltalk2'])
def test_hub_formats_from_local_files(tmp_path, tok, rows):
    path = write_jsonl(tmp_path/'prefs.jsonl', rows)
    train, val = load_preference_records(DPOConfig(dataset=path, val_examples=3))
    assert (len(train), len(val)) == (9, 3)
    pairs, report = prepare_pairs(train + val, tok, max_length=64)
    assert report['bad'] == 0 and len(pairs) == 12
    texts = {tok.decode(p.prompt + p.chosen) for p in pairs}
    assert all(any(f'q{i}<|im_end|>' in t and t.endswith(f'good {i}<|im_end|>') for t in texts) for i in range(12))


def test_hub_dataset_path_uses_the_named_splits(monkeypatch):
    "A Hub name goes to datasets.load_dataset with dpo.split / dpo.val_split (mocked: no network)."
    import datasets
    calls = []
    def fake(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(H4[:10] if split == 'train_prefs' else H4[10:])
    monkeypatch.setattr(datasets, 'load_dataset', fake)
    dc = DPOConfig(dataset='HuggingFaceH4/ultrafeedback_binarized', split='train_prefs', val_split='test_prefs', val_examples=5)
    train, val = load_preference_records(dc)
    assert calls == [('HuggingFaceH4/ultrafeedback_binarized', None, 'train_prefs'),
                     ('HuggingFaceH4/ultrafeedback_binarized', None, 'test_prefs')]
    assert (len(train), len(val)) == (10, 2)


def test_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    import datasets
    def fail(*a, **k): raise ConnectionError("Couldn't reach 'nobody/prefs' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, 'load_dataset', fail)
    with pytest.raises(PreferenceDataError, match=r"dpo.dataset: cannot load 'nobody/prefs'"):
        load_preference_records(DPOConfig(dataset='nobody/prefs'))


def test_bad_pairs_are_counted_and_named(tmp_path, tok):
    rows = TRL_LIB[:4] + [{'prompt': 'q', 'chosen': 'same', 'rejected': 'same'}, {'prompt': 'q', 'chosen': 'x'},
                          {'prompt': 'q', 'chosen': '', 'rejected': 'y'}]
    with pytest.warns(UserWarning, match=r"skipped 3 of 7 records .*#4 chosen and rejected are identical, #5 missing field 'rejected'"):
        pairs, report = prepare_pairs(rows, tok, max_length=64)
    assert len(pairs) == 4 and report['bad'] == 3 and report['first_bad'] == [4, 5, 6]
    with pytest.raises(PreferenceDataError, match="record 4: chosen and rejected are identical"):
        prepare_pairs(rows, tok, max_length=64, on_bad='error')


def test_missing_local_file_and_bad_config_are_clear_errors(tmp_path):
    with pytest.raises(PreferenceDataError, match="no such file"):
        load_preference_records(DPOConfig(dataset=str(tmp_path/'nope.jsonl')))
    with pytest.raises(ConfigError, match=r"dpo.max_length: both replies"):
        load_config('tiny', {'run.stage': 'dpo', 'dpo.max_length': 100, 'train.seq_len': 128})
    with pytest.raises(ConfigError, match=r"dpo.label_smoothing: only the 'robust' loss"):
        load_config('tiny', {'run.stage': 'dpo', 'dpo.label_smoothing': 0.1})


# ------------------------------------------------------------------------------------------- packing
def test_packing_keeps_pairs_whole_and_scores_like_separate_passes(tok):
    from smollm_kit.dpo import demo_preferences
    train, _ = demo_preferences(24, 4)
    pairs, _ = prepare_pairs(train, tok, max_length=64)
    model = perturbed_model(load_config('tiny').model, 3)
    order = list(range(len(pairs)))[::-1]
    batch, nxt = pack_pairs(pairs, order, 0, seq_len=256, rows=2)
    assert 2 < nxt < len(pairs)                                  # the batch filled up; the rest waits
    assert batch['pair_idx'].tolist() == order[:nxt]
    assert (batch['targets'][batch['seq_ids'] < 0] == -100).all() and (batch['targets'][batch['seq_ids'] >= 0] != -100).all()
    assert batch['seq_ids'].max().item() == 2 * nxt - 1
    for k in range(nxt):                                         # chosen and rejected of a pair share a row
        rows = {int(r) for s in (2 * k, 2 * k + 1) for r in torch.nonzero(batch['seq_ids'] == s)[:, 0]}
        assert len(rows) == 1
    with torch.no_grad():
        pc, pr = sequence_logps(model, batch)
        one = [pack_pairs(pairs, [i], 0, seq_len=256, rows=1)[0] for i in order[:nxt]]
        alone = torch.stack([torch.stack(sequence_logps(model, b)).flatten() for b in one])
    torch.testing.assert_close(torch.stack([pc, pr], 1), alone, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------- the stage
from smollm_kit.dpo import RefLogpCache, dpo
from smollm_kit.monitor import read_metrics

DPO_KEYS = ['train/rewards/chosen', 'train/rewards/rejected', 'train/rewards/accuracies', 'train/rewards/margins',
            'train/logps/chosen', 'train/logps/rejected', 'train/loss', 'val/rewards/accuracies', 'val/rewards/margins']


def small(run_dir, **over):
    "dpo-tiny on a smaller demo set and batch: same mechanics, a few seconds."
    return load_config('dpo-tiny', {'run.run_dir': str(run_dir), 'logging.progress': False, 'logging.every_steps': 1,
                                    'dpo.demo_pairs': 300, 'train.seq_len': 128, **over})


def records(run_dir):
    "Last record per step (a resumed run logs the steps after its checkpoint again)."
    out = {}
    for r in read_metrics(run_dir)[0]: out.setdefault(r['step'], {}).update(r)
    return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp('dpo')
    seen = []
    res = dpo(small(d, **{'train.max_steps': 20, 'train.eval_every': 10}), callbacks=[seen.append])
    return res, seen


def test_held_out_preference_accuracy_rises_clearly_above_chance(trained):
    "Seeded: from a fresh tiny model, 20 DPO steps on the demo set rank most held-out pairs the right way."
    res, _ = trained
    recs = records(res.run_dir)
    assert recs[0]['val/rewards/accuracies'] == 0 and recs[0]['val/rewards/margins'] == 0  # policy == reference
    assert recs[20]['val/rewards/accuracies'] >= 0.65, recs[20]
    assert recs[20]['val/rewards/margins'] > 0.5 and recs[20]['val/loss'] < math.log(2) - 0.1


def test_every_documented_metric_is_logged(trained):
    res, seen = trained
    last = records(res.run_dir)[20]
    assert not [k for k in DPO_KEYS if k not in last]
    assert 0 <= last['train/rewards/accuracies'] <= 1 and last['train/logps/chosen'] < 0
    assert abs(last['train/rewards/margins'] - (last['train/rewards/chosen'] - last['train/rewards/rejected'])) < 1e-4
    assert any('val/rewards/accuracies' in r for r in seen)          # callbacks (live plots) get the records
    assert res.stage == 'dpo' and (res.run_dir/'checkpoints'/'step_00000020').is_dir()


def test_reference_model_option_gives_the_same_first_steps(trained, tmp_path):
    "A frozen reference model in memory and the precomputed cache give the same losses and rewards."
    res, _ = trained
    d = tmp_path/'live'
    dpo(small(d, **{'train.max_steps': 3, 'train.eval_every': 0, 'dpo.reference': 'model'}))
    assert not (d/'ref_logps').exists()
    a, b = records(res.run_dir), records(d)
    for s in (1, 2, 3):
        for k in ('train/loss', 'train/rewards/margins', 'train/rewards/chosen'):
            assert abs(a[s][k] - b[s][k]) < 1e-4 * max(1, abs(a[s][k])), (s, k, a[s][k], b[s][k])


def test_precompute_killed_midway_resumes_to_the_same_cache(tmp_path, monkeypatch):
    over = {'train.max_steps': 1, 'train.eval_every': 0, 'dpo.ref_shard_pairs': 64}
    dpo(small(tmp_path/'whole', **over))
    write, calls = RefLogpCache.write, []
    def die_after_first(self, i, c, r):
        write(self, i, c, r); calls.append(i)
        raise RuntimeError('killed during precompute')
    monkeypatch.setattr(RefLogpCache, 'write', die_after_first)
    with pytest.raises(RuntimeError, match='killed'): dpo(small(tmp_path/'killed', **over))
    monkeypatch.setattr(RefLogpCache, 'write', lambda self, i, c, r: (calls.append(i), write(self, i, c, r)))
    dpo(small(tmp_path/'killed', **over))
    n_shards = math.ceil(300 / 64)
    assert calls == list(range(n_shards)) + [0], calls   # the rerun computed only what was missing (+ the val shard)
    for split in ('train', 'val'):
        [a] = (tmp_path/'whole'/'ref_logps').glob(f'{split}-*')
        [b] = (tmp_path/'killed'/'ref_logps').glob(f'{split}-*')
        assert a.name == b.name and sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for f in a.iterdir():
            x, y = torch.load(f), torch.load(b/f.name)
            assert torch.equal(x['chosen'], y['chosen']) and torch.equal(x['rejected'], y['rejected'])


def test_resume_after_interrupt_is_exact(tmp_path):
    "Interrupted at step 5 (SIGINT: saved, stopped), then resumed: steps 6-8 log what an uninterrupted run logs."
    import os, signal
    over = {'train.max_steps': 8, 'train.eval_every': 4, 'checkpoint.every_steps': 100}
    dpo(small(tmp_path/'a', **over))
    def interrupt(rec):
        if rec.get('step') == 5 and 'train/loss' in rec: os.kill(os.getpid(), signal.SIGINT)
    res = dpo(small(tmp_path/'b', **over), callbacks=[interrupt])
    assert res.interrupted and res.step == 5
    res = dpo(small(tmp_path/'b', **over))
    assert res.resumed_from == 5 and res.step == 8
    a, b = records(tmp_path/'a'), records(tmp_path/'b')
    for s in range(1, 9):
        for k in ('train/loss', 'train/rewards/accuracies', 'train/rewards/margins', 'train/logps/rejected'):
            assert a[s][k] == b[s][k], (s, k)
    assert a[8]['val/rewards/accuracies'] == b[8]['val/rewards/accuracies']


def test_epochs_budget_counts_packed_batches(tmp_path):
    from smollm_kit.dpo import dpo_stage
    from smollm_kit.export import init_model
    cfg = small(tmp_path, **{'train.max_steps': None, 'train.epochs': 2.0, 'train.grad_accum_steps': 2})
    model, tok = init_model(cfg)
    st = dpo_stage(cfg, model, tok)
    per_epoch, pos = 0, 0
    order = st.order(0)
    while pos < len(order):
        b, pos = pack_pairs(st.pairs, order, pos, 128, 8); per_epoch += 1
    assert st.budget_steps(cfg.train, 1) == math.ceil(2 * per_epoch / 2)
    seen = set()
    for _ in range(per_epoch): seen.update(st.next_batch(None)['pair_idx'].tolist())
    assert seen == set(range(len(st.pairs))) and st.epoch == 0      # one epoch visits every pair once
    # a budget in examples is that fraction of an epoch: half the pairs take half an epoch's steps
    from smollm_kit.trainer import Trainer
    half = small(tmp_path/'half', **{'train.max_steps': None, 'train.max_examples': len(st.pairs) // 2, 'train.grad_accum_steps': 2})
    assert st.num_examples() == len(st.pairs)
    assert Trainer(half, model, st)._total_steps() == st.budget_steps(dataclasses.replace(half.train, epochs=(len(st.pairs) // 2) / len(st.pairs)), 1)
    st.next_batch(None); assert st.epoch == 1


def test_wrong_stage_and_changed_data_are_clear_errors(trained, tmp_path):
    with pytest.raises(ConfigError, match="run.stage: this is the dpo stage, but the config says .pretrain."):
        dpo(load_config('tiny', {'run.run_dir': str(tmp_path)}))
    res, _ = trained
    d = tmp_path/'changed'
    shutil.copytree(res.run_dir, d)
    with pytest.raises(ConfigError, match="training pairs differ from the checkpoint"):
        dpo(small(d, **{'train.max_steps': 30, 'train.eval_every': 10, 'dpo.max_pairs': 200}), force=True)


DDP_SCRIPT = '''
import os, sys, torch
torch.set_num_threads(1)
from smollm_kit.config import load_config
from smollm_kit.dpo import dpo, weights_digest
res = dpo(load_config('dpo-tiny', {'run.run_dir': sys.argv[1], 'logging.progress': False, 'train.max_steps': 2,
                                   'train.eval_every': 0, 'dpo.demo_pairs': 120, 'train.seq_len': 128, 'train.parallel': 'ddp'}))
print(f"rank {os.environ['RANK']} weights {weights_digest(res.model)}", flush=True)
'''

def test_two_ranks_under_ddp_stay_identical(tmp_path):
    "torchrun, 2 gloo processes: each rank trains on its own packed batches (different pair counts) and the replicas agree."
    import os, re, socket, subprocess, sys
    script = tmp_path/'ddp_dpo.py'; script.write_text(DDP_SCRIPT)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', str(script),
                        str(tmp_path/'run')], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'WANDB_MODE': 'disabled'})
    assert p.returncode == 0, p.stderr[-3000:]
    digests = dict(re.findall(r'rank (\d) weights (\w+)', p.stdout))
    assert set(digests) == {'0', '1'} and digests['0'] == digests['1'], p.stdout[-2000:]


def test_reference_model_refuses_a_resume_whose_starting_weights_are_gone(tmp_path):
    "reference: model keeps the starting weights in memory; resumed after init_from was deleted, it must not take the trained policy instead."
    from smollm_kit.pretrain import pretrain
    src = tmp_path/'src'
    pretrain(load_config('tiny', {'run.run_dir': str(src), 'train.max_steps': 2, 'train.eval_every': 0, 'logging.progress': False}))
    over = {'run.init_from': str(src), 'dpo.reference': 'model', 'train.eval_every': 0, 'checkpoint.every_steps': 2}
    dpo(small(tmp_path/'run', **{'train.max_steps': 2, **over}))
    shutil.rmtree(src)
    with pytest.warns(UserWarning, match='no longer exists'), pytest.raises(ConfigError, match='dpo.reference: model needs the weights this run started from'):
        dpo(small(tmp_path/'run', **{'train.max_steps': 4, **over}))
