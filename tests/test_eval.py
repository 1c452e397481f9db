"""Downstream evaluation on lm-evaluation-harness: the adapter's log-likelihoods, rolling perplexity and generation
against direct computations with the model, end to end through lm-eval on local task YAMLs (no Hub), and `smollm eval`."""
import argparse, dataclasses, json, math, os

os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ['HF_HUB_OFFLINE'] = '1'

import pytest, torch, yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from smollm_kit.checkpoint import CheckpointManager
from smollm_kit.cli import main as cli_main
from smollm_kit.config import CheckpointConfig, ModelConfig
from smollm_kit.eval import (SUITE, EvalError, KitLM, add_eval_args, eval_main, evaluate_model, periodic_eval, resolve_tasks,
                             suite_scores, suite_table, task_manager)
from smollm_kit.export import export_hf, load_model
from smollm_kit.generate import generate_text
from smollm_kit.model import SmolLM
from smollm_kit.monitor import read_metrics
from lm_eval.api.instance import Instance

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["the cat sat on the mat.", "a dog ate the bone!", "what is two plus two? four", "paris is the capital of france"]


def tiny_tokenizer(chat_template=None):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=320, special_tokens=['<|endoftext|>', '<s>', '<pad>'],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>', eos_token='<|endoftext|>', pad_token='<pad>')
    if chat_template: tok.chat_template = chat_template
    return tok


def save_ckpt(run_dir, model, step, chat_template=None):
    "Save `model` the way the trainer does; returns the checkpoint directory."
    mgr = CheckpointManager(run_dir, CheckpointConfig(keep_last=5), async_save=False)
    path = mgr.save(step, model.state_dict(), {'step': step}, config_yaml=yaml.safe_dump({'model': dataclasses.asdict(model.cfg)}),
                    tokenizer=tiny_tokenizer(chat_template))
    mgr.close()
    return path


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A run directory with two checkpoints (steps 10, 20) of a tiny random model, and its metrics.jsonl up to step 20."
    d = tmp_path_factory.mktemp('run')
    torch.manual_seed(0)
    mc = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=320, max_seq_len=48, tie_embeddings=False)
    m = SmolLM(mc).eval()
    save_ckpt(d, m, 10)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * 0.02)
    save_ckpt(d, m, 20)
    (d/'metrics.jsonl').write_text(''.join(json.dumps({'step': s, 'train/loss': 5.0 - s / 10}) + '\n' for s in (10, 20)))
    return d


def direct_logprob(model, ctx, cont):
    with torch.no_grad(): lp = model(torch.tensor([ctx + cont[:-1]]))[0, len(ctx) - 1:].float().log_softmax(-1)
    return lp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), lp.argmax(-1).tolist()


def write_task(d, name, rows, body):
    d.mkdir(parents=True, exist_ok=True)
    (d/f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (d/f'{name}.yaml').write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {d/(name + '.jsonl')}}}}}\n"
                                  f"test_split: test\n{body}")
    return d


MC = ('output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
      'metric_list: [{metric: acc}]\n')


# ------------------------------------------------------------------------------------------------- the adapter
def test_loglikelihood_matches_direct_computation(run):
    model, tok = load_model(run)
    lm = KitLM(model, tok, batch_size=3, max_batch_tokens=40, progress=False)
    ctxs = ['the cat sat', 'a dog', 'what is two plus two?', 'paris is the']
    conts = [' on the mat', ' ate the bone!', ' four', ' capital']
    reqs = [Instance('loglikelihood', {}, (c, x), i) for i, (c, x) in enumerate(zip(ctxs, conts))]
    reqs.append(Instance('loglikelihood', {}, ('', 'the cat'), 9))  # empty context: conditioned on BOS alone
    got = lm.loglikelihood(reqs)
    for (c, x), (lp, greedy) in zip(list(zip(ctxs, conts)) + [('', 'the cat')], got):
        ctx = [tok.bos_token_id] + tok.encode(c, add_special_tokens=False)
        cont = tok.encode(c + x, add_special_tokens=False)[len(ctx) - 1:]
        want, argmax = direct_logprob(model, ctx, cont)
        assert lp == pytest.approx(want, abs=1e-4)
        assert greedy == (argmax == cont)
    # is_greedy is True exactly for the model's own greedy token
    ctx = [tok.bos_token_id] + tok.encode('the cat sat', add_special_tokens=False)
    best = direct_logprob(model, ctx, [0])[1][0]
    other = (best + 1) % len(tok)
    (lp_best, g_best), (lp_other, g_other) = lm.score_pairs([(ctx, [best]), (ctx, [other])])
    assert g_best and not g_other and lp_best > lp_other
    if hasattr(model, 'token_logprobs'):  # the model's own log-probabilities agree
        ids = torch.tensor([ctx + [best]])
        tgt = torch.full_like(ids, -100); tgt[0, -2] = best
        assert model.token_logprobs(ids, tgt).sum().item() == pytest.approx(lp_best, abs=1e-4)


def test_long_context_keeps_its_end(run):
    model, tok = load_model(run)
    lm = KitLM(model, tok, progress=False)
    ctx = [tok.bos_token_id] + tok.encode(' '.join(TEXTS * 3), add_special_tokens=False)
    cont = tok.encode(' the mat', add_special_tokens=False)
    assert len(ctx) + len(cont) > model.cfg.max_seq_len + 1
    full = (ctx + cont)[-(model.cfg.max_seq_len + 1):]
    want, _ = direct_logprob(model, full[:-len(cont)], cont)
    assert lm.score_pairs([(ctx, cont)])[0][0] == pytest.approx(want, abs=1e-4)


def test_loglikelihood_rolling_task_end_to_end(run, tmp_path):
    "A perplexity task: lm-eval's bits_per_byte equals the one computed window by window from the model."
    model, tok = load_model(run)
    docs = [{'text': ' '.join(TEXTS * 2)}, {'text': TEXTS[1]}]
    d = write_task(tmp_path/'tasks', 'toy_ppl', docs, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                   'doc_to_target: "{{text}}"\nmetric_list: [{metric: bits_per_byte}]\n')
    r = evaluate_model(run, str(d), batch_size=2, bootstrap_iters=0, progress=False, device='cpu')
    L, total = model.cfg.max_seq_len, 0.0
    for doc in docs:
        seq = [tok.bos_token_id] + tok.encode(doc['text'], add_special_tokens=False)
        for a in range(0, len(seq) - 1, L):  # each token predicted once; the last window gets a full context
            b = min(a + L, len(seq) - 1)
            with torch.no_grad(): lp = model(torch.tensor([seq[max(0, b - L):b]]))[0, -(b - a):].log_softmax(-1)
            total += lp.gather(-1, torch.tensor(seq[a + 1:b + 1])[:, None]).sum().item()
    assert len(tok.encode(docs[0]['text'])) > L  # several windows
    nbytes = sum(len(doc['text'].encode()) for doc in docs)
    assert r['metrics']['eval/toy_ppl/bits_per_byte'] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)


def test_generation_task_scored_end_to_end(run, tmp_path):
    "generate_until + exact_match: answers equal to the model's greedy output score 1, the others 0."
    model, tok = load_model(run)
    qs = ['the cat', 'a dog ate', 'what is', 'paris is the capital', 'two plus']
    greedy = generate_text(model, tok, [[tok.bos_token_id] + tok.encode(q, add_special_tokens=False) for q in qs],
                           stop=['.'], max_new_tokens=5, temperature=0)
    rows = [{'q': q, 'a': g if i % 2 == 0 else g + ' nope'} for i, (q, g) in enumerate(zip(qs, greedy))]
    d = write_task(tmp_path/'tasks', 'toy_gen', rows, 'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
                   'target_delimiter: ""\ngeneration_kwargs: {until: ["."], max_gen_toks: 5, do_sample: false}\n'
                   'metric_list: [{metric: exact_match}]\n')
    r = evaluate_model(run, str(d), batch_size=2, bootstrap_iters=0, progress=False, device='cpu', log_samples=True)
    assert [s['resps'][0][0] for s in sorted(r['samples']['toy_gen'], key=lambda s: s['doc_id'])] == greedy
    assert r['metrics']['eval/toy_gen/exact_match'] == pytest.approx(3 / 5)


def test_multiple_choice_accuracy_and_hf_dir_agree(run, tmp_path):
    "acc is 'the label is the most likely choice'; the exported HF directory gives the same numbers."
    model, tok = load_model(run)
    lm = KitLM(model, tok, progress=False)
    rows = [{'q': c, 'choices': [' mat', ' bone', ' four'], 'label': i % 3} for i, c in enumerate(['the cat sat on the', 'a dog ate the',
                                                                                              'two plus two is', 'paris is'])]
    d = write_task(tmp_path/'tasks', 'toy_mc', rows, MC)
    r = evaluate_model(run, [str(d)], bootstrap_iters=0, progress=False, device='cpu')
    right = [max(range(3), key=lambda j: lm.score_pairs([lm._encode_pair(x['q'], x['choices'][j])])[0][0]) == x['label'] for x in rows]
    assert r['metrics']['eval/toy_mc/acc'] == pytest.approx(sum(right) / len(right))
    assert r['step'] == 20 and r['tasks'] == ['toy_mc']
    hf = export_hf(run, tmp_path/'hf')
    assert evaluate_model(hf, str(d), bootstrap_iters=0, progress=False, device='cpu')['metrics'] == r['metrics']


def test_chat_template_renders_prompts(tmp_path):
    torch.manual_seed(1)
    mc = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=320, max_seq_len=96, tie_embeddings=False)
    ckpt = save_ckpt(tmp_path/'chat', SmolLM(mc).eval(), 5, chat_template=CHAT)
    d = write_task(tmp_path/'tasks', 'toy_chat', [{'q': 'what is two plus two?', 'a': 'four'}],
                   'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
                   'generation_kwargs: {until: ["<|im_end|>"], max_gen_toks: 4}\nmetric_list: [{metric: exact_match}]\n')
    r = evaluate_model(ckpt, str(d), apply_chat_template=True, bootstrap_iters=0, progress=False, device='cpu', log_samples=True)
    prompt = r['samples']['toy_chat'][0]['arguments'][0][0]
    assert prompt == '<|im_start|>user\nwhat is two plus two?<|im_end|>\n<|im_start|>assistant\n'
    with pytest.raises(ValueError, match='no chat template'):
        evaluate_model(load_model(ckpt)[0], str(d), tokenizer=tiny_tokenizer(), apply_chat_template=True, progress=False)


# ------------------------------------------------------------------------------------------- tasks, CLI, records
def test_resolve_tasks_and_errors(tmp_path):
    assert resolve_tasks('smol')[0] == SUITE
    assert resolve_tasks('hellaswag, arc_easy')[0] == ['hellaswag', 'arc_easy']
    d = write_task(tmp_path/'t', 'toy_mc', [{'q': 'a', 'choices': ['b'], 'label': 0}], MC)
    assert resolve_tasks([str(d), 'toy_mc']) == (['toy_mc'], [str(d)])
    assert task_manager([str(d)], ['toy_mc']).all_tasks == ['toy_mc']  # lm-eval's own index not needed
    (tmp_path/'empty').mkdir()
    with pytest.raises(ValueError, match='has no task YAML'): resolve_tasks(str(tmp_path/'empty'))
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"): task_manager([str(d)], ['toy_mc', 'no_such_task'])


def test_missing_task_data_is_a_clear_error(run, tmp_path):
    d = write_task(tmp_path/'tasks', 'toy_mc', [{'q': 'a', 'choices': [' b'], 'label': 0}], MC)
    (d/'toy_mc.jsonl').unlink()
    with pytest.raises(EvalError, match=r"could not load a task's data: .*toy_mc\.jsonl"):
        evaluate_model(run, str(d), bootstrap_iters=0, progress=False, device='cpu')


def test_suite_table_reference_rows():
    m = {'eval/hellaswag/acc_norm': 0.40, 'eval/hellaswag/acc': 0.1, 'eval/arc_easy/acc_norm': 0.5, 'eval/arc_challenge/acc_norm': 0.3}
    s = suite_scores(m)
    assert s == pytest.approx({'hellaswag': 40.0, 'arc': 40.0})
    t = suite_table(m, name='mine')
    assert '| HellaSwag | 40.0 | 42.1 | 54.5 |' in t and '| PIQA | – | 68.4 | 71.7 |' in t


def test_eval_cli_records_results(run, tmp_path, capsys):
    d = write_task(tmp_path/'tasks', 'toy_mc', [{'q': 'the cat sat on the', 'choices': [' mat', ' bone'], 'label': 0},
                                                {'q': 'a dog ate the', 'choices': [' mat', ' bone'], 'label': 1}], MC)
    d = write_task(d, 'toy_mc2', [{'q': 'paris is', 'choices': [' four', ' the'], 'label': 1}], MC.replace('acc}', 'acc_norm}'))
    p = add_eval_args(argparse.ArgumentParser())
    assert eval_main(p.parse_args(['--model', str(run), '--tasks', str(d/'toy_mc.yaml'), '--bootstrap-iters', '0', '--device', 'cpu'])) == 0
    assert eval_main(p.parse_args(['--model', str(run), '--tasks', str(d/'toy_mc2.yaml'), '--bootstrap-iters', '0', '--device', 'cpu'])) == 0
    res = json.loads((run/'eval_results.json').read_text())
    assert res['step'] == 20 and set(res['results']) == {'toy_mc', 'toy_mc2'}  # same checkpoint: merged
    recs, events = read_metrics(run)
    assert recs[-1]['step'] == 20 and recs[-1]['train/loss'] == 3.0
    assert {'eval/toy_mc/acc', 'eval/toy_mc2/acc_norm'} <= set(recs[-1])
    # the older checkpoint: an 'eval' event at step 10, the history of steps 10..20 stays intact
    ck10 = run/'checkpoints'/sorted(os.listdir(run/'checkpoints'))[0]
    assert eval_main(p.parse_args(['--model', str(ck10), '--tasks', str(d/'toy_mc.yaml'), '--bootstrap-iters', '0', '--device', 'cpu',
                                   '--output', str(tmp_path/'out')])) == 0
    recs2, events2 = read_metrics(run)
    assert [r['step'] for r in recs2] == [10, 20] and recs2[-1] == recs[-1]
    assert events2[-1]['event'] == 'eval' and events2[-1]['step'] == 10 and 'eval/toy_mc/acc' in events2[-1]
    assert json.loads((tmp_path/'out'/'eval_results.json').read_text())['step'] == 10
    with pytest.raises(ValueError, match='--limit'):
        eval_main(p.parse_args(['--model', str(run), '--tasks', str(d), '--limit', '0']))
    # through the `smollm` command: an ordinary mistake is one line and exit code 2
    (tmp_path/'empty').mkdir()
    capsys.readouterr()
    assert cli_main(['eval', '--model', str(run), '--tasks', str(tmp_path/'empty')]) == 2
    assert capsys.readouterr().err.strip() == f"smollm eval: error: tasks: {tmp_path/'empty'} has no task YAML (a file with a top-level 'task: <name>' line)"


def test_periodic_eval_on_live_model(run, tmp_path):
    model, tok = load_model(run)
    d = write_task(tmp_path/'tasks', 'toy_mc', [{'q': 'the cat sat on the', 'choices': [' mat', ' bone'], 'label': i % 2} for i in range(4)], MC)
    ev = periodic_eval(str(d), limit=2)
    torch.manual_seed(3); want = torch.rand(4)
    torch.manual_seed(3); m = ev(model, tok)
    assert torch.equal(torch.rand(4), want)  # lm-eval's seeding does not leak into the caller's (the trainer's) RNG
    assert set(m) == {'eval/toy_mc/acc'}
    assert m['eval/toy_mc/acc'] == evaluate_model(model, str(d), tokenizer=tok, limit=2, bootstrap_iters=0, progress=False, device='cpu')['metrics']['eval/toy_mc/acc']


def test_downstream_eval_during_training_is_logged_and_plotted(tmp_path):
    "`train.eval_tasks`: every evaluation also runs the tasks on `eval_limit` examples; `eval/*` reach metrics.jsonl and the live plot."
    from smollm_kit.pretrain import pretrain
    from smollm_kit.config import load_config
    from smollm_kit.liveplot import LivePlot
    from smollm_kit.monitor import read_metrics
    d = write_task(tmp_path/'tasks', 'toy_mc', [{'q': 'def add(a, b):', 'choices': [' return', ' 7'], 'label': i % 2} for i in range(6)], MC)
    cfg = load_config('tiny', {'run.run_dir': str(tmp_path/'run'), 'train.max_steps': 4, 'train.eval_every': 2, 'train.eval_batches': 1,
                               'train.eval_tasks': [str(d)], 'train.eval_limit': 4, 'logging.progress': False})
    live = LivePlot(cfg, show=False)
    pretrain(cfg, callbacks=[live])
    recs, _ = read_metrics(tmp_path/'run')
    assert [r['step'] for r in recs if 'eval/toy_mc/acc' in r] == [0, 2, 4]       # before training, then at every evaluation
    assert all(0 <= r['eval/toy_mc/acc'] <= 1 for r in recs if 'eval/toy_mc/acc' in r)
    assert 'downstream' in live.panels()
