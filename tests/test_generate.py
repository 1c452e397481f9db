"Tests of smollm_kit.generate: KV-cache decoding, batching, sampling, stop conditions, streaming, REPL, CLI hook."
import argparse, sys, types
import pytest, torch
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast
from smollm_kit.config import ModelConfig
from smollm_kit.model import SmolLM
from smollm_kit.generate import (sample_next, generate_ids, generate, generate_text, TextStream, interactive,
                                 add_generate_args, generate_main, encode_prompt)

CHAT_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<bos>assistant:{% endif %}")


def toy_tokenizer(chat=False):
    "A byte-level BPE trained on a few sentences (includes non-ASCII text so characters span several tokens)."
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=['<bos>', '<eos>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["the cat sat on the mat.", "a dog ate the bone!", "hello world, how are you?",
                           "café au lait", "naïve"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token='<bos>', eos_token='<eos>')
    if chat: tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope='module')
def tok(): return toy_tokenizer()


def tiny_model(vocab=320, seed=0, **kw):
    "A random fp32 model; untied embeddings because a random *tied* model just repeats its input token greedily."
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=vocab,
                                max_seq_len=96, nope_every=4, tie_embeddings=False), **kw})
    return SmolLM(cfg).eval()




PROMPTS = [[0, 5, 9, 30, 31, 7, 8], [0, 7], [0, 3, 44, 45, 46], [12]]


def scripted(*lines):
    it = iter(lines)
    def read(prompt):
        for line in it: return line
        raise EOFError
    return read


# --- KV cache -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('nope_every', [4, 1, 0])  # hybrid, all NoPE, all RoPE
def test_greedy_with_cache_equals_full_recomputation(nope_every):
    m = tiny_model(nope_every=nope_every)
    cached = generate_ids(m, PROMPTS, 30, temperature=0)
    full = generate_ids(m, PROMPTS, 30, temperature=0, use_cache=False)
    assert cached == full
    assert all(len(o) == 30 and len(set(o)) > 5 for o in cached)  # varied output, not one repeated token


def test_cache_logits_match_full_forward_every_step():
    "Decoding logits with the cache equal the full forward's, step by step (positions and NoPE handled)."
    m = tiny_model()
    ids = torch.randint(0, 320, (3, 20))
    docs = torch.zeros(3, 20, dtype=torch.long); docs[1, :6] = -1; docs[2, :11] = -1
    with torch.no_grad():
        full = m(ids, docs)
        cache = m.new_cache(3, 20)
        steps = [m(ids[:, :12], docs[:, :12], cache=cache)] + [m(ids[:, i:i+1], docs[:, i:i+1], cache=cache) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, 1)[docs == 0], full[docs == 0], atol=1e-5, rtol=1e-5)


def test_batched_equals_one_by_one():
    m = tiny_model()
    batched = generate_ids(m, PROMPTS, 25, temperature=0)
    assert len({tuple(o) for o in batched}) == len(PROMPTS)
    assert batched == [generate_ids(m, [p], 25, temperature=0)[0] for p in PROMPTS]


def test_padding_never_influences_results():
    "A prompt's continuation does not depend on which other prompts (hence how much padding) share its batch."
    m = tiny_model()
    alone = generate_ids(m, [[0, 7]], 20, temperature=0)[0]
    for other in ([0] * 1, [5] * 40, list(range(60))):
        assert generate_ids(m, [other, [0, 7]], 20, temperature=0)[1] == alone


def test_max_new_tokens_and_context_limit():
    m = tiny_model()
    assert generate_ids(m, PROMPTS, 0) == [[], [], [], []]
    out = generate_ids(m, [[1] * 90, [2]], 50, temperature=0)
    assert [len(o) for o in out] == [6, 6]  # stops when the 96-token context is full
    with pytest.raises(ValueError, match='a prompt of 97 tokens exceeds model.max_seq_len=96'):
        generate_ids(m, [[1] * 97], 5)
    with pytest.raises(ValueError, match=r'prompt_ids\[1\]: empty prompt'): generate_ids(m, [[1], []], 5)
    assert generate_ids(m, [], 5) == []


# --- sampling -----------------------------------------------------------------------------------------------------

def test_seed_reproducibility_and_global_rng_untouched():
    m = tiny_model()
    state = torch.random.get_rng_state()
    a = generate_ids(m, PROMPTS, 20, temperature=1.0, top_p=None, seed=123)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == generate_ids(m, PROMPTS, 20, temperature=1.0, top_p=None, seed=123)
    assert a != generate_ids(m, PROMPTS, 20, temperature=1.0, top_p=None, seed=124)
    assert a != generate_ids(m, PROMPTS, 20, temperature=0)  # it really sampled


def test_top_k_1_and_tiny_top_p_equal_greedy():
    m = tiny_model()
    greedy = generate_ids(m, PROMPTS, 20, temperature=0)
    assert generate_ids(m, PROMPTS, 20, temperature=1.5, top_k=1, top_p=None, seed=0) == greedy
    assert generate_ids(m, PROMPTS, 20, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, 0.5]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=3, generator=g).tolist()) == {1, 2, 4}
    p = logits[0].softmax(-1)  # sorted: 1 (.53), 2 (.20), 4 (.12), 0 (.07), 3 (.03)
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {1, 2}
    freq = torch.bincount(sample_next(logits, 1.0, generator=g), minlength=5) / 4000
    torch.testing.assert_close(freq, p, atol=0.03, rtol=0)
    hot = torch.bincount(sample_next(logits, 0.25, generator=g), minlength=5) / 4000
    assert hot[1] > 0.95  # low temperature concentrates on the argmax


@pytest.mark.parametrize('kw, match', [(dict(temperature=-1), 'temperature: must be >= 0'), (dict(top_k=0), 'top_k: must be >= 1'),
                                       (dict(top_p=1.5), r'top_p: must be in \(0, 1\]'), (dict(max_new_tokens=-1), 'max_new_tokens: must be >= 0')])
def test_bad_sampling_arguments(kw, match):
    with pytest.raises(ValueError, match=match): generate_ids(tiny_model(), [[1]], **{'max_new_tokens': 3, **kw})


# --- stop conditions ----------------------------------------------------------------------------------------------

def test_eos_stops_a_row_and_is_not_returned():
    m = tiny_model()
    greedy = generate_ids(m, PROMPTS, 20, temperature=0)
    k = next(i for i in range(3, 20) if greedy[0][i] not in greedy[0][:i])  # a token first produced at step k >= 3
    eos = greedy[0][k]
    out = generate_ids(m, PROMPTS, 20, temperature=0, eos_id=eos)
    for g, o in zip(greedy, out): assert o == (g[:g.index(eos)] if eos in g else g)
    assert len(out[0]) == k
    assert generate_ids(m, PROMPTS, 20, temperature=0, eos_id=[eos, greedy[1][0]])[1] == []  # several EOS ids


def test_stop_strings_cut_text_and_end_generation(tok):
    m = tiny_model(vocab=len(tok))
    full = generate(m, tok, 'the cat', max_new_tokens=40, temperature=0)[0]
    stop = full[10:13]
    assert stop and full.find(stop) < 20
    calls = []
    cut = generate(m, tok, 'the cat', max_new_tokens=40, temperature=0, stop=[stop, 'zzzz'],
                   stream=lambda i, s: calls.append(s))
    assert cut == [full[:full.find(stop)]]
    assert ''.join(calls) == cut[0] and stop not in ''.join(calls)
    n = []  # the same stop through the lower-level hook: generation really ends early
    generate_ids(m, [encode_prompt(tok, 'the cat')], 40, temperature=0, eos_id=tok.eos_token_id,
                 on_token=lambda i, t: n.append(t) or stop in tok.decode(n))
    assert len(n) < 40


def test_batched_text_generation_equals_single(tok):
    m = tiny_model(vocab=len(tok))
    prompts = ['the cat', 'hello world, how', 'a']
    batch = generate(m, tok, prompts, max_new_tokens=15, temperature=0, stop='.')
    assert batch == [generate(m, tok, p, max_new_tokens=15, temperature=0, stop='.')[0] for p in prompts]


# --- streaming ----------------------------------------------------------------------------------------------------

def test_streaming_pieces_add_up_and_print(tok, capsys):
    m = tiny_model(vocab=len(tok))
    pieces = []
    out = generate(m, tok, ['the cat', 'café'], max_new_tokens=25, temperature=1.0, seed=1, stream=lambda i, s: pieces.append((i, s)))
    for row in (0, 1): assert ''.join(s for i, s in pieces if i == row) == out[row]
    assert len([1 for i, s in pieces if i == 0]) > 1  # really incremental
    printed = generate(m, tok, 'the cat', max_new_tokens=25, temperature=1.0, seed=1, stream=True)
    assert capsys.readouterr().out == printed[0] == generate(m, tok, 'the cat', max_new_tokens=25, temperature=1.0, seed=1)[0]
    assert len(printed[0]) > 10
    with pytest.raises(ValueError, match='stream=True prints one prompt'): generate(m, tok, ['a', 'b'], stream=True)


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tok):
    text = 'café au lait 🙂. naïve cat'
    ids = tok.encode(text, add_special_tokens=False)
    assert any('\ufffd' in tok.decode(ids[:i]) for i in range(1, len(ids)))  # some prefix ends mid-character
    s = TextStream(tok)
    pieces = [s.push(t) for t in ids]
    assert not any('\ufffd' in p for p in pieces)
    assert ''.join(pieces) + s.flush() == text
    s = TextStream(tok, stop=['. na'])
    pieces = [s.push(t) for t in ids]
    assert ''.join(pieces) + s.flush() == 'café au lait 🙂' and s.stopped


def test_text_stream_keeps_leading_space_of_first_token(tok):
    "Decoding the continuation with the prompt's last token as context keeps its leading space."
    ids = tok.encode('the cat sat', add_special_tokens=False)
    cut = len(tok.encode('the cat', add_special_tokens=False))
    s = TextStream(tok, prefix=ids[cut - 1:cut])
    assert ''.join(s.push(t) for t in ids[cut:]) + s.flush() == ' sat'


# --- REPL and CLI -------------------------------------------------------------------------------------------------

def test_interactive_plain_continuation(tok):
    m = tiny_model(vocab=len(tok))
    shown = []
    turns = interactive(m, tok, scripted('the cat', '', 'hello', 'quit', 'never'), shown.append, max_new_tokens=8, temperature=0)
    assert [t[0] for t in turns] == ['the cat', 'hello']
    for prompt, reply in turns: assert reply == generate(m, tok, prompt, max_new_tokens=8, temperature=0)[0]
    assert turns[0][1] in ''.join(shown) and 'no chat template' in shown[0]


def test_interactive_chat_keeps_history_and_reset_clears_it():
    tok = toy_tokenizer(chat=True)
    m = tiny_model(vocab=len(tok))
    turns = interactive(m, tok, scripted('hello', 'the cat', '/reset', 'the cat'), lambda s: None, max_new_tokens=6, temperature=0)
    assert len(turns) == 3
    history = [{'role': 'user', 'content': 'hello'}, {'role': 'assistant', 'content': turns[0][1]}, {'role': 'user', 'content': 'the cat'}]
    ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert turns[1][1] == generate_text(m, tok, [ids], max_new_tokens=6, temperature=0)[0]
    fresh = tok.encode(tok.apply_chat_template(history[2:], add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert turns[2][1] == generate_text(m, tok, [fresh], max_new_tokens=6, temperature=0)[0]


def test_interactive_chat_drops_oldest_turns_when_context_is_full():
    tok = toy_tokenizer(chat=True)
    m = tiny_model(vocab=len(tok), max_seq_len=48)
    lines = ['hello world, how are you?'] * 6
    turns = interactive(m, tok, scripted(*lines), lambda s: None, max_new_tokens=8, temperature=0)
    assert len(turns) == 6  # no error although the whole history exceeds the 48-token context


@pytest.fixture
def fake_export(monkeypatch, tok):
    "Stand-in for smollm_kit.export.load_model (written by another module)."
    m = tiny_model(vocab=len(tok))
    mod = types.ModuleType('smollm_kit.export')
    mod.load_model = lambda path: (m, tok)
    monkeypatch.setitem(sys.modules, 'smollm_kit.export', mod)
    return m


def test_generate_main_prompt(fake_export, tok, capsys):
    args = add_generate_args(argparse.ArgumentParser()).parse_args(
        ['--checkpoint', 'ckpt', '--prompt', 'the cat', '--temperature', '0', '--max-new-tokens', '12', '--device', 'cpu'])
    assert generate_main(args) == 0
    expect = generate(fake_export, tok, 'the cat', max_new_tokens=12, temperature=0)[0]
    assert capsys.readouterr().out == 'the cat' + expect + '\n'


def test_generate_main_interactive(fake_export, tok, capsys):
    args = add_generate_args(argparse.ArgumentParser()).parse_args(
        ['--checkpoint', 'ckpt', '--prompt', 'hello', '--interactive', '--temperature', '0', '--max-new-tokens', '5', '--device', 'cpu'])
    assert generate_main(args, input_fn=scripted('the cat')) == 0
    out = capsys.readouterr().out
    for p in ('hello', 'the cat'): assert generate(fake_export, tok, p, max_new_tokens=5, temperature=0)[0] in out


def test_generate_main_several_prompts_and_lead_style_args(fake_export, tok, capsys):
    "The CLI's own parser may use other defaults ('auto' device, a list of prompts, no --stop): all accepted."
    args = argparse.Namespace(checkpoint='ckpt', prompt=['the cat', 'hello'], interactive=False, max_new_tokens=6,
                              temperature=0.0, top_k=None, top_p=None, seed=0, device='auto')
    assert generate_main(args) == 0
    outs = generate(fake_export, tok, ['the cat', 'hello'], max_new_tokens=6, temperature=0)
    assert capsys.readouterr().out == f"the cat{outs[0]}\n\nhello{outs[1]}\n\n"


def test_generate_main_without_tokenizer(monkeypatch):
    mod = types.ModuleType('smollm_kit.export')
    mod.load_model = lambda path: (tiny_model(), None)
    monkeypatch.setitem(sys.modules, 'smollm_kit.export', mod)
    with pytest.raises(ValueError, match='has no tokenizer'):
        generate_main(argparse.Namespace(checkpoint='ckpt', prompt=['x']))


def test_generate_main_needs_prompt_or_interactive():
    with pytest.raises(ValueError, match='give --prompt TEXT or --interactive'):
        generate_main(argparse.Namespace(checkpoint='x', prompt=[], interactive=False))
