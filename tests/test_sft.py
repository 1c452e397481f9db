"""The SFT stage: ChatML template and assistant masks, the template's round trip through checkpoints and the
Hugging Face export, best-fit-decreasing packing, bad and overlong records, the token-weighted loss, exact resume,
learning on the offline demo chat set, and the `smollm chat` REPL."""
import io, json, math, signal, sys, warnings
from pathlib import Path
import numpy as np, pytest, torch, torch.nn.functional as F
from smollm_kit import load_config
from smollm_kit.config import ModelConfig
from smollm_kit.data import load_tokenizer, DataError
from smollm_kit.model import SmolLM
from smollm_kit.monitor import read_metrics
from smollm_kit.pretrain import pretrain
from smollm_kit.trainer import Trainer
import importlib
S = importlib.import_module("smollm_kit.sft")   # `smollm_kit.sft` the attribute is the stage function
from smollm_kit.generate import add_chat_args, chat_main, generate, generate_text

CHAT = [{'role': 'system', 'content': 'Answer briefly.'}, {'role': 'user', 'content': 'What is 17 + 25?'},
        {'role': 'assistant', 'content': '17 + 25 = 42. The answer is 42.'},
        {'role': 'user', 'content': 'And if you add 3 to that?'}, {'role': 'assistant', 'content': '42 + 3 = 45. The answer is 45.'}]

@pytest.fixture(scope='module')
def tok():
    return S.ensure_chat_format(load_tokenizer(load_config('tiny')))

def hub_like_tokenizer(template=None):
    "A byte-level BPE tokenizer without ChatML tokens, like most base-model tokenizers on the Hub."
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE()); tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(['What is the answer? The answer is 42.'] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=['<s>', '</s>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>', eos_token='</s>')
    if template: t.chat_template = template
    return t

# -- template and masks -------------------------------------------------------------------------------------------

def test_assistant_mask_covers_exactly_the_replies_and_their_end_tokens(tok):
    ids, mask = S.render_chat(tok, CHAT)
    assert len(ids) == len(mask)
    im_start, im_end = tok.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>'])
    # split the rendering into turns at <|im_start|>; each turn's masked tokens are its content + <|im_end|> iff assistant
    starts = [i for i, t in enumerate(ids) if t == im_start] + [len(ids)]
    assert len(starts) - 1 == len(CHAT)
    for msg, a, b in zip(CHAT, starts, starts[1:]):
        turn_ids, turn_mask = ids[a:b], mask[a:b]
        masked = [t for t, m in zip(turn_ids, turn_mask) if m]
        if msg['role'] == 'assistant':
            assert masked[-1] == im_end and tok.decode(masked[:-1]) == msg['content']
        else: assert masked == []
    text = tok.decode(ids)
    assert text == ''.join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)

def test_generation_prompt_and_default_system_prompt():
    t = S.ensure_chat_format(hub_like_tokenizer(), system_prompt='You are SmolLM.')
    user = [{'role': 'user', 'content': 'hi'}]
    assert t.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == \
        '<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
    own = [{'role': 'system', 'content': 'Be terse.'}] + user           # a chat's own system message wins
    assert t.apply_chat_template(own, tokenize=False).count('system') == 1 and 'Be terse.' in t.apply_chat_template(own, tokenize=False)

def test_ensure_chat_format_adds_tokens_replaces_markerless_template_and_grows_the_model():
    t = hub_like_tokenizer(template="{% for m in messages %}{{ m['content'] }}{% endfor %}")  # no generation markers
    n0 = len(t)
    torch.manual_seed(0)
    m = SmolLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=n0, max_seq_len=64, tie_embeddings=False))
    head0 = m.lm_head.weight.detach().clone()
    S.ensure_chat_format(t, m)
    assert len(t) == n0 + 2 and m.cfg.vocab_size == n0 + 2 and S.has_generation_markers(t.chat_template)
    assert m.lm_head.weight.shape == (n0 + 2, 32) and torch.equal(m.lm_head.weight[:n0].detach(), head0)
    assert torch.allclose(m.lm_head.weight[n0:].detach(), head0.mean(0).expand(2, -1))
    ids, mask = S.render_chat(t, CHAT[1:3])
    assert max(ids) == n0 + 1 and sum(mask) > 0
    m(torch.tensor([ids]))                                                 # the grown model takes the new ids
    assert len(S.ensure_chat_format(t)) == n0 + 2                          # idempotent

# -- records, packing, overlong ---------------------------------------------------------------------------------

def test_bfd_packing_keeps_every_token_and_no_row_overflows(tok):
    train, _ = S.demo_chats(300, 0, seed=3)
    enc = S.encode_chats(train, tok, seq_len=96)
    data = S.SFTData(enc, 96, micro_batch_size=8, pad_id=tok.pad_token_id, seed=0)
    rows = [data.row(r) for r in range(len(data))]
    placed = sorted(i for b in data.bins for i in b)
    assert placed == list(range(len(enc.ids)))
    real = sum(int((doc < len(b)).sum()) for (ids, doc, tgt), b in zip(rows, data.bins))
    assert real == sum(len(x) for x in enc.ids)                            # all tokens kept, none over seq_len (fixed width)
    # every conversation appears intact in its row, and targets never cross into the next conversation
    for (ids, doc, tgt), b in zip(rows, data.bins):
        p = 0
        for k, i in enumerate(b):
            n = len(enc.ids[i])
            assert (ids[p:p+n] == enc.ids[i]).all() and tgt[p+n-1] == -100
            p += n
    assert data.efficiency == pytest.approx(real / (len(rows) * 96))
    assert len(data) < len(enc.ids) and data.efficiency > 0.8              # several chats per row

def test_bad_records_are_skipped_counted_and_named_or_stop_the_run(tok, tmp_path):
    good = {'messages': CHAT[1:3]}
    recs = [good, {'messages': [{'role': 'user', 'content': 'no reply'}]}, good,
            {'messages': [{'role': 'wizard', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}]},
            {'messages': [{'role': 'user', 'content': ''}, {'role': 'assistant', 'content': 'y'}]},
            {'messages': [{'role': 'user', 'content': ['a']}, {'role': 'assistant', 'content': 'y'}]}, good]
    f = tmp_path/'chats.jsonl'
    f.write_text(''.join(json.dumps(r) + '\n' for r in recs))
    enc = S.encode_chats(S.load_records(str(f)), tok, 128)
    st = enc.stats
    assert (st['records'], st['kept'], st['bad']) == (7, 3, 4)
    assert [e.split(':')[0] for e in st['bad_examples']] == ['1', '3', '4', '5']
    with pytest.warns(S.SFTDataWarning, match=r"skipped 4 bad record\(s\) \(first: 1: messages: no assistant turn"):
        S.report_stats(st)
    with pytest.raises(DataError, match=r"record 1: messages: no assistant turn"):
        S.encode_chats(recs, tok, 128, on_bad_record='error')
    with pytest.raises(DataError, match=r"record 1: messages\[0\]\.role: unknown role 'wizard'"):
        S.encode_chats(recs[2:], tok, 128, on_bad_record='error')

def test_overlong_conversations_are_truncated_or_dropped_and_counted(tok):
    long = {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'word ' * 100}]}
    late = {'messages': [{'role': 'user', 'content': 'word ' * 100}, {'role': 'assistant', 'content': 'ok'}]}
    short = {'messages': CHAT[1:3]}
    t = S.encode_chats([long, late, short], tok, 64, overlong='truncate')
    assert (t.stats['truncated'], t.stats['dropped_overlong'], t.stats['kept']) == (1, 1, 2)  # `late` has no reply left
    assert len(t.ids[0]) == 64 and t.masks[0][1:].any()
    d = S.encode_chats([long, late, short], tok, 64, overlong='drop')
    assert (d.stats['truncated'], d.stats['dropped_overlong'], d.stats['kept']) == (0, 2, 1)
    with pytest.warns(S.SFTDataWarning, match='dropped 2 conversation'): S.report_stats(d.stats)

def test_loss_on_switch_for_prompt_completion_data(tok):
    rec = {'prompt': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Bye'}],
           'completion': 'Goodbye.'}
    def targets(loss_on):
        e = S.encode_chats([rec], tok, 128, loss_on=loss_on)
        return tok.decode(e.ids[0][e.masks[0]])
    assert targets('completion') == 'Goodbye.<|im_end|>'
    assert targets('assistant') == 'Hello.<|im_end|>Goodbye.<|im_end|>'
    assert targets('all') == tok.apply_chat_template(S.record_messages(rec)[0], tokenize=False)

def test_hub_datasets_are_loaded_through_datasets_streaming_or_not(monkeypatch, tok):
    import datasets
    rows = [{'messages': CHAT[1:3]}] * 10
    calls = []
    def fake_load(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split, streaming))
        return iter(rows) if streaming else datasets.Dataset.from_list(rows)
    monkeypatch.setattr(datasets, 'load_dataset', fake_load)
    cfg = load_config('sft-tiny', {'sft.dataset': 'HuggingFaceTB/smol-smoltalk', 'sft.streaming': True, 'sft.max_examples': 4,
                                   'sft.val_split': 'test', 'sft.val_examples': 2})
    train, val = S.sft_records(cfg)
    assert (len(train), len(val)) == (4, 2)
    assert calls == [('HuggingFaceTB/smol-smoltalk', None, 'train', True), ('HuggingFaceTB/smol-smoltalk', None, 'test', True)]
    cfg = load_config('sft-tiny', {'sft.dataset': 'HuggingFaceTB/smol-smoltalk', 'sft.val_examples': 3})
    train, val = S.sft_records(cfg)
    assert (len(train), len(val)) == (7, 3) and calls[-1][3] is False

def test_parquet_prompt_completion_files(tmp_path, tok):
    import pandas as pd
    pd.DataFrame({'prompt': ['What is 2 + 2?', 'Say hi.'], 'completion': ['4.', 'Hi.']}).to_parquet(tmp_path/'pc.parquet')
    enc = S.encode_chats(S.load_records(str(tmp_path)), tok, 64)
    assert enc.stats['kept'] == 2 and tok.decode(enc.ids[0][enc.masks[0]]) == '4.<|im_end|>'
    with pytest.raises(DataError, match='no such file'): S.load_records(str(tmp_path/'nope.jsonl'))

# -- runs -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    d = tmp_path_factory.mktemp('pre')
    pretrain(load_config('tiny', {'run.run_dir': str(d), 'train.max_steps': 40, 'train.grad_accum_steps': 1, 'train.eval_every': 0,
                                  'logging.progress': False, 'checkpoint.every_steps': 100}))
    return d

def sft_cfg(run_dir, init_from, **over):
    o = {'run.run_dir': str(run_dir), 'run.init_from': str(init_from), 'logging.progress': False, 'logging.every_steps': 1,
         'train.grad_accum_steps': 1, 'sft.demo_examples': 1500, 'sft.val_examples': 48, 'sft.eval_generations': 48, 'sft.max_new_tokens': 24}
    return load_config('sft-tiny', o | over)

@pytest.fixture(scope='module')
def sft_run(pretrained, tmp_path_factory):
    d = tmp_path_factory.mktemp('sft')
    res = S.sft(sft_cfg(d, pretrained, **{'train.epochs': None, 'train.max_steps': 150, 'train.eval_every': 150}))
    return res

def test_sft_lowers_assistant_loss_and_raises_exact_match(sft_run):
    "A short seeded run: held-out assistant-token loss falls, replies take the asked-for shape, and some are right."
    # 150 CPU steps get a few held-out answers right (mostly word counts; bench/stage_gains.py sft runs longer)
    before, after = sft_run.first_eval, sft_run.metrics
    print(f"val/loss {before['val/loss']:.3f} -> {after['val/loss']:.3f}; exact match {before['val/exact_match']:.3f} -> "
          f"{after['val/exact_match']:.3f}; format {before['val/format_acc']:.3f} -> {after['val/format_acc']:.3f}")
    assert after['val/loss'] < before['val/loss'] - 1.0
    assert after['val/exact_match'] > before['val/exact_match']
    assert after['val/format_acc'] > before['val/format_acc'] + 0.3
    recs, events = read_metrics(sft_run.run_dir)
    ev = [e for e in events if e.get('event') == 'sft_data']
    assert len(ev) == 1 and 0 < ev[0]['packing_efficiency'] <= 1 and ev[0]['train']['kept'] == 1500

def test_template_survives_checkpoint_and_hf_export(sft_run, tmp_path, tok):
    from transformers import AutoTokenizer
    from smollm_kit import load_model, export_hf
    _, ck_tok = load_model(sft_run.run_dir)
    assert ck_tok.chat_template == S.CHAT_TEMPLATE
    out = export_hf(sft_run.run_dir, tmp_path/'hf')
    assert json.loads((out/'tokenizer_config.json').read_text())['chat_template'] == S.CHAT_TEMPLATE
    hf = AutoTokenizer.from_pretrained(str(out))
    def ids(o): return list(o['input_ids'] if hasattr(o, 'keys') else o)   # transformers 5 returns a BatchEncoding, 4.x a list
    for msgs in (CHAT, CHAT[1:3]):
        assert ids(hf.apply_chat_template(msgs)) == S.render_chat(tok, msgs)[0]    # the ids the kit trained on
        gen = hf.apply_chat_template(msgs[:-1], add_generation_prompt=True)
        assert ids(gen) == S.render_chat(tok, msgs[:-1], add_generation_prompt=True)[0]
    o = hf.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assert list(o['assistant_masks']) == S.render_chat(tok, CHAT)[1]

def test_chat_repl_reads_stdin(sft_run, monkeypatch, capsys):
    lines = ['What is 12 + 30?', '/system Answer briefly.', 'Reply in uppercase: the cat', '/reset', '/quit', 'never read']
    monkeypatch.setattr(sys, 'stdin', io.StringIO('\n'.join(lines) + '\n'))
    args = add_chat_args(__import__('argparse').ArgumentParser()).parse_args(['--model', str(sft_run.run_dir), '--temperature', '0',
                                                                             '--max-new-tokens', '24', '--device', 'cpu'])
    assert chat_main(args) == 0
    out = capsys.readouterr().out
    assert '(system message set; history cleared)' in out and '(history cleared)' in out
    # the first reply is what generate(messages=...) gives for the same chat: the REPL renders with the template
    from smollm_kit import load_model
    model, t = load_model(sft_run.run_dir)
    first = generate(model, t, messages=[{'role': 'user', 'content': lines[0]}], max_new_tokens=24, temperature=0)[0]
    assert first and first in out and '<|im_end|>' not in out

def test_chat_refuses_a_model_without_chat_template(pretrained):
    args = add_chat_args(__import__('argparse').ArgumentParser()).parse_args(['--model', str(pretrained)])
    with pytest.raises(ValueError, match='has no chat template'): chat_main(args, input_fn=lambda p: '/quit')

def test_step_loss_is_token_weighted_across_micro_batches(pretrained, tmp_path):
    cfg = sft_cfg(tmp_path, pretrained, **{'train.max_steps': 1, 'train.grad_accum_steps': 3, 'train.micro_batch_size': 2,
                                           'sft.demo_examples': 300})
    from smollm_kit.export import init_model
    model, t = init_model(cfg)
    stage = S.sft_stage(cfg, model, t)
    probe = S.SFTData(stage.data.enc, cfg.train.seq_len, 2, t.pad_token_id, cfg.run.seed)
    batches = [probe.next_batch() for _ in range(3)]
    with torch.no_grad():
        ce = [F.cross_entropy(model(b['input_ids'], b['doc_ids']).flatten(0, 1), b['targets'].flatten(), reduction='none') for b in batches]
        counts = [int((b['targets'] != -100).sum()) for b in batches]
    expected = sum(float(c.sum()) for c in ce) / sum(counts)               # the mean over every target token of the step
    mean_of_means = sum(float(c.sum()) / n for c, n in zip(ce, counts)) / 3
    assert len(set(counts)) > 1 and abs(expected - mean_of_means) > 1e-4   # the two weightings really differ here
    trainer = Trainer(cfg, model, stage, tokenizer=t)
    out = trainer.train_step()
    assert out['loss'] == pytest.approx(expected, rel=1e-5) and out['n'] == sum(counts)

def test_resume_gives_identical_losses(pretrained, tmp_path):
    over = {'train.epochs': None, 'train.max_steps': 8, 'checkpoint.every_steps': 100, 'train.eval_every': 0,
            'sft.demo_examples': 200, 'sft.val_examples': 8, 'sft.eval_generations': 0, 'train.micro_batch_size': 4}
    straight = S.sft(sft_cfg(tmp_path/'a', pretrained, **over))
    def stop_at_3(rec):
        if rec.get('step') == 3 and 'train/loss' in rec and 'event' not in rec: signal.raise_signal(signal.SIGTERM)
    first = S.sft(sft_cfg(tmp_path/'b', pretrained, **over), callbacks=[stop_at_3])
    assert first.interrupted and first.step == 3
    second = S.sft(sft_cfg(tmp_path/'b', pretrained, **over))
    assert second.resumed_from == 3 and second.step == 8
    def losses(d):
        recs, _ = read_metrics(d)
        return {r['step']: r['train/loss'] for r in recs if 'train/loss' in r}
    a, b = losses(straight.run_dir), losses(second.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b                                                          # bit-identical, including steps 4-8 after the resume

def test_stage_warns_and_logs_skipped_and_cut_records(tmp_path):
    good = {'messages': CHAT[1:3]}
    recs = [good] * 20 + [{'messages': [{'role': 'user', 'content': 'x'}]},
                          {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'word ' * 300}]}]
    (tmp_path/'d.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    cfg = load_config('sft-tiny', {'sft.dataset': str(tmp_path/'d.jsonl'), 'sft.val_examples': 0, 'run.run_dir': str(tmp_path/'run')})
    torch.manual_seed(0)
    model, t = SmolLM(cfg.model), load_tokenizer(cfg)
    with pytest.warns(S.SFTDataWarning, match=r"22 records, kept 21; skipped 1 bad record.*truncated 1 conversation"):
        stage = S.sft_stage(cfg, model, t)
    logged = []
    class Ctx: log = staticmethod(logged.append)
    stage.setup(Ctx())
    ev = logged[0]
    assert ev['event'] == 'sft_data' and (ev['train']['bad'], ev['train']['truncated'], ev['train']['kept']) == (1, 1, 21)
    assert ev['bad_examples'][0].startswith('20: messages: no assistant turn') and stage.key_metric == 'val/loss'
    assert stage.val is None and stage.evaluate(Ctx()) == {}

def test_encoded_data_is_cached_in_the_run_directory(tmp_path, monkeypatch):
    train, _ = S.demo_chats(60, 0, seed=5)
    (tmp_path/'d.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in train))
    cfg = load_config('sft-tiny', {'sft.dataset': str(tmp_path/'d.jsonl'), 'sft.val_examples': 6, 'run.run_dir': str(tmp_path/'run')})
    def stage():
        torch.manual_seed(0)
        return S.sft_stage(cfg, SmolLM(cfg.model), load_tokenizer(cfg))
    first = stage()
    assert len(list((tmp_path/'run'/'sft_data').glob('*/train.npz'))) == 1
    monkeypatch.setattr(S, 'load_records', lambda *a, **k: pytest.fail('read the dataset instead of the cache'))
    second = stage()
    assert second.data.fingerprint == first.data.fingerprint and second.stats == first.stats
    assert [e['answer'] for e in second.examples] == [e['answer'] for e in first.examples]

def test_sigkill_then_rerun_is_bit_identical(pretrained, tmp_path):
    "`kill -9` of `smollm sft` at a random moment after its first checkpoint; the same command again resumes exactly."
    import os, random, subprocess, sys, time
    sets = ['train.epochs=null', 'train.max_steps=12', 'checkpoint.every_steps=2', 'checkpoint.every_minutes=null',
            'train.eval_every=0', 'logging.every_steps=1', 'logging.progress=false', 'train.micro_batch_size=4',
            'train.grad_accum_steps=1', 'sft.demo_examples=200', 'sft.val_examples=8', 'sft.eval_generations=0']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled', 'HF_HUB_OFFLINE': '1'}
    def cmd(d): return [sys.executable, '-m', 'smollm_kit.cli', 'sft', '--config', 'sft-tiny', '--init-from', str(pretrained),
                        '--run-dir', str(d), *[a for s in sets for a in ('--set', s)]]
    def losses(d): return {r['step']: r['train/loss'] for r in read_metrics(d)[0] if 'train/loss' in r}
    assert subprocess.run(cmd(tmp_path/'a'), env=env, capture_output=True).returncode == 0
    p = subprocess.Popen(cmd(tmp_path/'b'), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path/'b'/'checkpoints'/'step_00000002'/'manifest.json').exists():
        assert p.poll() is None, 'the run ended before its first checkpoint'
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.5)); p.kill(); p.wait()
    killed_at = max(losses(tmp_path/'b'), default=0)
    assert killed_at < 12, "the run finished before the kill: nothing was tested"
    assert subprocess.run(cmd(tmp_path/'b'), env=env, capture_output=True).returncode == 0
    assert losses(tmp_path/'b') == losses(tmp_path/'a') and sorted(losses(tmp_path/'a')) == list(range(1, 13))
