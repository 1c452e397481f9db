"Data pipeline: tokenizer, demo corpus, sources, shuffling, packing, mixture, exact resume, ranks, workers, bad input."
import io, json, logging, os, random, signal, socket, subprocess, sys
import pytest, torch
import datasets
import smollm_kit.data as D
import smollm_kit.tokenizer as T
from smollm_kit.config import ConfigError, load_config
from smollm_kit.data import DataError, PretrainData, load_tokenizer, train_tokenizer

WORDS = "the a of model data token train batch learn rate loss value step layer small large fast slow good".split()

def make_docs(n, seed=0, prefix='doc'):
    r = random.Random(seed)
    return [f"{prefix}{i:04d} " + ' '.join(r.choice(WORDS) for _ in range(r.randint(3, 40))) for i in range(n)]

def write_jsonl(p, texts, **extra):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(''.join(json.dumps({'text': t, **extra}) + '\n' for t in texts))
    return p

# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope='session')
def demo_cache(tmp_path_factory):
    "A fresh cache with the demo corpus and the tiny preset's demo tokenizer, built once for the session."
    d = tmp_path_factory.mktemp('cache')
    D.demo_tokenizer(2048, str(d))
    return d

@pytest.fixture(scope='session')
def tok_dir(tmp_path_factory):
    "A small byte-level BPE trained on the kind of documents the tests use."
    d = tmp_path_factory.mktemp('tok')
    train_tokenizer(make_docs(400, seed=1) + make_docs(100, seed=2, prefix='web') + make_docs(100, seed=3, prefix='gen'), 512, d)
    return d

@pytest.fixture(scope='session')
def tok(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)

def make_cfg(tok_dir, domains, seq_len=32, B=4, eval_batches=2, val_docs=3, workers=0, seed=0, **data):
    return load_config({'run': {'seed': seed}, 'model': {'preset': 'tiny', 'vocab_size': 512},
                        'data': {'tokenizer': str(tok_dir), 'val_docs': val_docs, 'num_workers': workers, 'domains': domains, **data},
                        'train': {'max_steps': 10, 'seq_len': seq_len, 'micro_batch_size': B, 'eval_batches': eval_batches}})

def PD(cfg, tok, rank=0, world_size=1):
    "The pipeline as the pretraining stage builds it: the data section plus the few numbers it needs."
    return PretrainData(cfg.data, tok, cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches,
                        seed=cfg.run.seed, rank=rank, world_size=world_size)

def one_domain(path, **src): return [{'name': 'web', 'weight': 1.0, 'sources': [{'kind': 'local', 'path': str(path), **src}]}]

def gen_docs(n):
    "Generator of a mocked Hub stream (module level: datasets fingerprints it)."
    for t in make_docs(n, seed=3, prefix='gen'): yield {'text': t, 'id': t[:7]}

@pytest.fixture
def fake_hub(monkeypatch):
    "Mock the Hub: `fake/stream` is a local generator IterableDataset; record load_dataset calls; no network probe."
    calls, real = [], datasets.load_dataset
    def load_dataset(path, *a, **kw):
        if path == 'fake/stream':
            calls.append((path, kw))
            return datasets.IterableDataset.from_generator(gen_docs, gen_kwargs={'n': 60})
        return real(path, *a, **kw)
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    monkeypatch.setattr(D, '_hub_unreachable', lambda timeout=3.0: None)
    return calls

@pytest.fixture
def mixed(tmp_path, tok_dir, fake_hub):
    "A four-domain mixture over every kind of local source, a mocked Hub stream, and an eval-only domain."
    import pyarrow as pa, pyarrow.parquet as pq
    write_jsonl(tmp_path/'web'/'a.jsonl', make_docs(30, seed=11, prefix='web'), meta=1)
    write_jsonl(tmp_path/'web'/'b.jsonl', make_docs(20, seed=12, prefix='web'), meta=2)
    for i, t in enumerate(make_docs(7, seed=13)): (tmp_path/'books').mkdir(exist_ok=True); (tmp_path/'books'/f'{i}.txt').write_text(t)
    pq.write_table(pa.table({'content': make_docs(40, seed=14), 'n': list(range(40))}), tmp_path/'code.parquet', row_group_size=8)
    domains = [
        {'name': 'web', 'weight': 0.5, 'sources': [{'kind': 'local', 'path': str(tmp_path/'web'/'*.jsonl'), 'weight': 2},
                                                  {'kind': 'local', 'path': str(tmp_path/'books'), 'weight': 1}]},
        {'name': 'code', 'weight': 0.3, 'sources': [{'kind': 'local', 'path': str(tmp_path/'code.parquet'), 'text_field': 'content'}]},
        {'name': 'gen', 'weight': 0.2, 'sources': [{'kind': 'hub', 'path': 'fake/stream', 'name': 'cfg1', 'split': 'train'}]},
        {'name': 'evalonly', 'weight': 0.0, 'sources': [{'kind': 'local', 'path': str(tmp_path/'web'/'b.jsonl')}]}]
    return lambda **kw: make_cfg(tok_dir, domains, **kw)

def batches(data, n): return [data.next_batch() for _ in range(n)]

def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        for k in ('input_ids', 'doc_ids', 'targets'): assert torch.equal(x[k], y[k]), f"batch {i} differs in {k}"

def roundtrip(sd):
    "torch.save then torch.load(weights_only=True): the checkpoint path."
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
    return torch.load(buf, weights_only=True)

def split_docs(ids, tok):
    "Decode a contiguous token stream into documents (between BOS and EOS); the last may be cut."
    out, cur = [], None
    for t in ids:
        if t == tok.bos_token_id: cur = []
        elif t == tok.eos_token_id: out.append(tok.decode(cur)); cur = None
        elif cur is not None: cur.append(t)
    return out

def stream(bs):
    "A single-domain run's rows concatenated: the domain's token stream (rows overlap only through labels)."
    return [t for b in bs for row in b['input_ids'].tolist() for t in row]

# ---------------------------------------------------------------- tokenizer and demo corpus

def test_demo_corpus_is_deterministic_across_processes(demo_cache, tmp_path):
    other = tmp_path/'cache2'
    env = {**os.environ, 'PYTHONHASHSEED': '12345'}  # a different string-hash order must not matter
    subprocess.run([sys.executable, '-c', f"import smollm_kit.data as D; D.demo_corpus({str(other)!r})"], check=True, env=env, timeout=300)
    (a,), (b,) = list((demo_cache/'demo-corpus').iterdir()), list((other/'demo-corpus').iterdir())
    assert a.name == b.name
    for k in ('prose', 'code', 'math'): assert (a/f'{k}.jsonl').read_bytes() == (b/f'{k}.jsonl').read_bytes(), k
    assert D.demo_corpus(str(demo_cache)) == a and D.demo_tokenizer(2048, str(demo_cache)).parent == demo_cache/'tokenizers'  # cached
    man = json.loads((a/'manifest.json').read_text())
    assert all(man['domains'][k]['docs'] >= 100 for k in ('prose', 'code', 'math'))
    code = [json.loads(l) for l in (a/'code.jsonl').read_text().splitlines()[:50]]
    assert all(d['source'].endswith('.py') and not d['source'].startswith('test/') for d in code)

def test_train_tokenizer_deterministic_and_loadable(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    files = [write_jsonl(tmp_path/'a.jsonl', make_docs(200)), tmp_path/'b.txt']
    files[1].write_text("Ünïcödé text — with emoji 🦙 and code: def f(x): return x**2\n" * 20)
    train_tokenizer(files, 400, tmp_path/'t1'); train_tokenizer([str(f) for f in files], 400, tmp_path/'t2')
    assert (tmp_path/'t1'/'tokenizer.json').read_bytes() == (tmp_path/'t2'/'tokenizer.json').read_bytes()
    tk = AutoTokenizer.from_pretrained(tmp_path/'t1')
    assert isinstance(tk, PreTrainedTokenizerFast) and tk.is_fast
    assert (tk.bos_token, tk.eos_token, tk.pad_token) == ('<s>', '</s>', '<pad>') and len(tk) <= 400
    s = "Ünïcödé 🦙 never seen: ∮ ∂x 漢字"
    assert tk.decode(tk(s, add_special_tokens=False).input_ids) == s  # byte-level: anything round-trips
    assert json.loads((tmp_path/'t1'/'tokenizer_config.json').read_text())['tokenizer_class'] == 'PreTrainedTokenizerFast'
    assert D.tokenizer_main(['train', str(tmp_path/'*.jsonl'), '--vocab-size', '300', '--out', str(tmp_path/'cli')]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path/'cli').eos_token == '</s>'
    import argparse, pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({'body': make_docs(100)}), tmp_path/'p.parquet')
    ns = argparse.Namespace(tok_command='train', files=[str(tmp_path/'p.parquet')], vocab_size=300, out=str(tmp_path/'pq'), text_field='body')
    assert D.tokenizer_main(ns) == 0 and len(AutoTokenizer.from_pretrained(tmp_path/'pq')) > 261  # the CLI's parsed arguments
    ns.text_field = 'text'
    with pytest.raises(DataError, match="p.parquet: no column 'text'"): D.tokenizer_main(ns)
    with pytest.raises(DataError, match='no text'): train_tokenizer([''], 300, tmp_path/'t3')

def test_load_tokenizer_checks(tok_dir, monkeypatch, tmp_path):
    cfg = make_cfg(tok_dir, one_domain('x'))
    assert len(load_tokenizer(cfg)) <= 512
    cfg.model.vocab_size = 300
    with pytest.raises(ConfigError, match=r'model.vocab_size: .* has \d+ tokens'): load_tokenizer(cfg)
    cfg.model.vocab_size = 512; cfg.data.tokenizer = str(tmp_path)
    with pytest.raises(DataError, match='no tokenizer.json'): load_tokenizer(cfg)

def test_tokenizer_hub_name_offline_is_a_quick_clear_error(tok_dir, monkeypatch):
    cfg = make_cfg(tok_dir, one_domain('x')); cfg.data.tokenizer = 'hf-internal-testing/llama-tokenizer'
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    def never(*a, **kw): raise AssertionError('went to the network although HF_HUB_OFFLINE is set')
    monkeypatch.setattr(socket, 'create_connection', never)  # no probe, no retries: the error comes at once
    with pytest.raises(DataError, match='Hub is unreachable .HF_HUB_OFFLINE is set'): load_tokenizer(cfg)
    monkeypatch.delenv('HF_HUB_OFFLINE')
    for k in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE'): monkeypatch.delenv(k, raising=False)
    def no_network(*a, **kw): raise OSError('Name or service not known')
    monkeypatch.setattr(socket, 'create_connection', no_network)
    with pytest.raises(DataError, match='cannot connect to huggingface.co'): load_tokenizer(cfg)

def test_demo_tokenizer_has_chatml_tokens_and_a_key_that_names_them(demo_cache, monkeypatch):
    from transformers import AutoTokenizer
    tk = AutoTokenizer.from_pretrained(D.demo_tokenizer(2048, str(demo_cache)))
    ids = tk.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>'])
    assert None not in ids and tk.unk_token_id not in ids and len(set(ids)) == 2
    turn = tk('<|im_start|>user\nhi<|im_end|>', add_special_tokens=False).input_ids
    assert turn[0] == ids[0] and turn[-1] == ids[1]  # each marker is one token, never split into pieces
    assert tk.decode(turn, skip_special_tokens=True) == 'user\nhi'
    assert (tk.bos_token, tk.eos_token, tk.pad_token) == ('<s>', '</s>', '<pad>')
    # a tokenizer cached with other special tokens (an older kit) lives under another key: never picked up again
    monkeypatch.setattr(T, '_cached_dir', lambda final, build: final)  # the path only, no training
    now = T.demo_tokenizer(2048, str(demo_cache))
    monkeypatch.setattr(T, 'SPECIAL_TOKENS', ['<s>', '</s>', '<pad>'])
    assert T.demo_tokenizer(2048, str(demo_cache)) != now

def test_tokenizer_args_are_defined_once():
    "`smollm tokenizer train` parses exactly what `add_tokenizer_args` defines."
    import argparse
    from smollm_kit.cli import build_parser
    argv = ['a.txt', 'b.jsonl', '--out', 'o', '--vocab-size', '300']
    ours = vars(D.add_tokenizer_args(argparse.ArgumentParser()).parse_args(argv))
    assert ours == {'files': ['a.txt', 'b.jsonl'], 'out': 'o', 'vocab_size': 300, 'text_field': 'text'}
    cli = vars(build_parser().parse_args(['tokenizer', 'train', *argv]))
    assert {k: cli[k] for k in ours} == ours and cli['tok_command'] == 'train'

def test_data_modules_import_without_torch():
    "The tokenizer worker processes import smollm_kit.tokenizer; `import smollm_kit.data` stays light too."
    code = ("import sys, smollm_kit.data, smollm_kit.tokenizer; from smollm_kit.tokenizer import _encode_in_worker; "
            "assert _encode_in_worker.__module__ == 'smollm_kit.tokenizer'; "
            "heavy = [m for m in ('torch', 'datasets', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]

# ---------------------------------------------------------------- packing contract

def test_batches_follow_the_contract_and_rebuild_the_documents(tmp_path, tok_dir, tok):
    docs = make_docs(60)
    cfg = make_cfg(tok_dir, one_domain(write_jsonl(tmp_path/'d.jsonl', docs)), seq_len=24, B=3, shuffle_buffer=0)  # file order
    with PD(cfg, tok) as data:
        bs = batches(data, 30)
        val = data.val_batches()['web']
    for b in bs:
        ids, dids, lab = b['input_ids'], b['doc_ids'], b['targets']
        assert ids.shape == dids.shape == lab.shape == (3, 24) and ids.dtype == dids.dtype == lab.dtype == torch.long
        assert (dids[:, 0] == 0).all() and ((dids[:, 1:] - dids[:, :-1]) >= 0).all() and ((dids[:, 1:] - dids[:, :-1]) <= 1).all()
        same = dids[:, 1:] == dids[:, :-1]
        assert torch.equal(lab[:, :-1][same], ids[:, 1:][same]) and (lab[:, :-1][~same] == -100).all()
        new_seg = torch.cat([torch.zeros(3, 1, dtype=torch.bool), ~same], 1)
        assert (ids[new_seg] == tok.bos_token_id).all()  # a new segment inside a row is a new document
        assert (lab != -100).float().mean() > 0.8  # no padding
    # last position's target is the next row's first token (the carried overlap), unless a document starts there
    rows = torch.cat([b['input_ids'] for b in bs]); labs = torch.cat([b['targets'] for b in bs])
    last = labs[:-1, -1]; nxt = rows[1:, 0]
    assert torch.equal(last[last != -100], nxt[last != -100]) and (nxt[last == -100] == tok.bos_token_id).all()
    # the rows are the documents, in order, after the held-out validation documents
    vdocs, tdocs = split_docs(stream(val), tok), split_docs(stream(bs), tok)
    k = docs.index(tdocs[0])
    assert k >= 3 and vdocs == docs[:len(vdocs)] and len(vdocs) <= k
    assert tdocs == (docs[k:] * 5)[:len(tdocs)]  # later epochs skip the held-out documents again
    assert len(tdocs) > len(docs) - k

def test_packing_efficiency_and_stats(tmp_path, tok_dir, tok):
    cfg = make_cfg(tok_dir, one_domain(write_jsonl(tmp_path/'d.jsonl', make_docs(50))), seq_len=64, B=2)
    with PD(cfg, tok) as data:
        bs = batches(data, 10)
        tgt = sum(int((b['targets'] != -100).sum()) for b in bs)
        assert data.packing_efficiency == pytest.approx(tgt / (10*2*64))
        s = data.stats
    assert s['rows'] == 20 and s['tokens'] == 20*64 and s['docs'] == s['domains']['web']['docs'] > 0 and s['skipped'] == {}

# ---------------------------------------------------------------- determinism, mixture, workers

def test_mixture_holds_to_within_a_row(mixed, tok):
    with PD(mixed(B=5), tok) as data:
        for n in range(1, 9):
            data.next_batch()
            s = data.stats['domains']
            for name, w in zip(data.names, data.weights): assert abs(s[name]['rows'] - w*5*n) <= 1, (name, n)
        assert data.stats['domains']['evalonly']['rows'] == 0 and len(data.val_batches()['evalonly']) == 2

def test_two_runs_and_any_worker_count_give_identical_batches(demo_cache):
    cfg = load_config('tiny', {'data.cache_dir': str(demo_cache)})
    tk = load_tokenizer(cfg)
    with PD(cfg, tk) as a, PD(cfg, tk) as b: ref, again = batches(a, 12), batches(b, 12)
    assert_same(ref, again)
    cfg2 = load_config('tiny', {'data.cache_dir': str(demo_cache), 'data.num_workers': 2})
    with PD(cfg2, tk) as c: assert_same(ref, batches(c, 12))
    assert not torch.equal(ref[0]['input_ids'], ref[1]['input_ids'])

def test_run_seed_changes_the_order_but_not_the_validation_set(demo_cache):
    cfgs = {seed: load_config('tiny', {'data.cache_dir': str(demo_cache), 'run.seed': seed}) for seed in (0, 1, 12345)}
    tk = load_tokenizer(cfgs[0])
    first, val = {}, {}
    for seed, cfg in cfgs.items():
        with PD(cfg, tk) as data: first[seed], val[seed] = batches(data, 2), data.val_batches()
    for a, b in ((0, 1), (0, 12345), (1, 12345)):
        assert not torch.equal(first[a][0]['input_ids'], first[b][0]['input_ids']), f"seeds {a} and {b} gave the same batch"
        for dom in val[a]: assert_same(val[a][dom], val[b][dom])
    with PD(cfgs[1], tk) as again: assert_same(first[1], batches(again, 2))  # a seed is a fixed order

def test_shuffle_gives_every_epoch_as_a_new_permutation(tmp_path, tok_dir, tok):
    docs = make_docs(40)
    cfg = make_cfg(tok_dir, one_domain(write_jsonl(tmp_path/'d.jsonl', docs)), shuffle_buffer=64)  # larger than the file
    with PD(cfg, tok) as data:
        got = []
        while data.stats['domains']['web']['epoch'] < 3: got.append(data.next_batch())  # three whole epochs
    seen = split_docs(stream(got), tok)
    n = len(set(seen)); train = docs[len(docs) - n:]  # validation holds out the first documents of the file
    assert set(seen) == set(train) and n < len(docs)
    epochs = [seen[i*n:(i+1)*n] for i in range(3)]
    for e in epochs: assert sorted(e) == sorted(train)  # each epoch: every training document exactly once
    assert epochs[0] != train and epochs[0] != epochs[1] != epochs[2]  # shuffled, and differently each epoch

def test_a_small_shuffle_buffer_keeps_documents_near_their_place(tmp_path, tok_dir, tok):
    docs = make_docs(120)
    cfg = make_cfg(tok_dir, one_domain(write_jsonl(tmp_path/'d.jsonl', docs)), shuffle_buffer=8)
    with PD(cfg, tok) as data: seen = split_docs(stream(batches(data, 20)), tok)
    pos = [docs.index(d) for d in seen]
    k = min(pos)
    assert len(set(pos)) == len(pos) and pos != sorted(pos)  # no repeats within the epoch, but shuffled
    assert all(p < k + i + 8 for i, p in enumerate(pos))      # the i-th draw comes from the first i+8 documents

# ---------------------------------------------------------------- exact resume

CUTS = [0, 1, 2, 3, 5, 8, 11, 13, 17, 20]

@pytest.mark.parametrize('workers', [0, 2])
def test_exact_resume_at_many_cut_points(mixed, tok, workers):
    "Mixture of jsonl/txt/parquet/mocked-Hub sources with epochs wrapping; states saved at many points."
    cfg = mixed(workers=workers)
    with PD(cfg, tok) as ref:
        states, out = {}, []
        for i in range(24):
            if i in CUTS: states[i] = roundtrip(ref.state_dict())
            out.append(ref.next_batch())
        assert max(v['epoch'] for v in ref.stats['domains'].values()) >= 1  # some source wrapped around
    with PD(cfg, tok) as other:
        batches(other, 4)  # mid-run, with read-ahead in flight: loading must discard it
        for i in [13, 0, 20, 5, 1, 17, 2, 8, 3, 11]:  # out of order on purpose
            other.load_state_dict(states[i])
            assert_same(out[i:i+4], batches(other, len(out[i:i+4])))
    with PD(cfg, tok) as fresh:  # a new process would start like this
        fresh.load_state_dict(states[11])
        assert_same(out[11:], batches(fresh, 13))
        assert fresh.stats['rows'] == 24 * cfg.train.micro_batch_size

def test_state_dict_is_primitives_and_tensors_only(mixed, tok):
    with PD(mixed(), tok) as data:
        batches(data, 3)
        sd = data.state_dict()
    def check(x, path='sd'):
        if isinstance(x, dict):
            for k, v in x.items(): assert isinstance(k, str), path; check(v, f'{path}.{k}')
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x): check(v, f'{path}[{i}]')
        else: assert x is None or isinstance(x, (bool, int, float, str, torch.Tensor)), f"{path}: {type(x)}"
    check(sd)
    assert roundtrip(sd)['counts'] == sd['counts']

def test_resume_with_a_different_setup_is_refused(tmp_path, tok_dir, tok, caplog):
    p = write_jsonl(tmp_path/'d.jsonl', make_docs(40))
    cfg = make_cfg(tok_dir, one_domain(p))
    with PD(cfg, tok) as a: batches(a, 2); sd = a.state_dict(); nxt = a.next_batch()
    with PD(cfg, tok, rank=0, world_size=2) as b:
        with pytest.raises(DataError, match='world_size: 1 then, 2 now'): b.load_state_dict(sd)
    with PD(make_cfg(tok_dir, one_domain(p), seq_len=16), tok) as b:
        with pytest.raises(DataError, match='seq_len: 32 then, 16 now'): b.load_state_dict(sd)
    with caplog.at_level(logging.WARNING, logger='smollm_kit.data'):  # safe to change (checkpoint.SAFE_RESUME_CHANGES)
        with PD(make_cfg(tok_dir, one_domain(p), eval_batches=3), tok) as b:
            b.load_state_dict(sd); assert_same([nxt], [b.next_batch()])
    assert any('eval_batches grew from 2 to 3' in r.message for r in caplog.records)

def test_a_new_mix_resumes_every_domain_where_it_was(tmp_path, tok_dir, tok):
    a, b = write_jsonl(tmp_path/'a.jsonl', make_docs(50, seed=1)), write_jsonl(tmp_path/'b.jsonl', make_docs(50, seed=2))
    doms = lambda wb: [{'name': 'a', 'weight': 1.0, 'sources': [{'kind': 'local', 'path': str(a)}]},
                       {'name': 'b', 'weight': wb, 'sources': [{'kind': 'local', 'path': str(b)}]}]
    with PD(make_cfg(tok_dir, doms(1.0)), tok) as old:  # rows alternate a, b, a, b
        batches(old, 3); sd = old.state_dict(); after = batches(old, 4)
    with PD(make_cfg(tok_dir, doms(0.0)), tok) as new:  # b becomes eval-only: every row from a
        new.load_state_dict(sd); got = batches(new, 2)
    a_rows = torch.cat([x['input_ids'][0::2] for x in after])
    assert torch.equal(torch.cat([x['input_ids'] for x in got]), a_rows[:8])
    assert new.stats['domains']['b']['rows'] == sd['rows'][1] and new.stats['domains']['a']['rows'] == sd['rows'][0] + 8

# ---------------------------------------------------------------- validation and ranks

def test_validation_is_fixed_and_held_out(tmp_path, tok_dir, tok):
    docs = make_docs(40)
    cfg = make_cfg(tok_dir, one_domain(write_jsonl(tmp_path/'d.jsonl', docs)), val_docs=5, shuffle_buffer=0)  # file order
    with PD(cfg, tok) as a, PD(cfg, tok) as b:
        va = a.val_batches()['web']
        assert len(va) == cfg.train.eval_batches and all(x['input_ids'].shape == (4, 32) for x in va)
        train = batches(a, 40)  # > 2 epochs of training documents
        assert_same(va, b.val_batches()['web'])
        b.load_state_dict(a.state_dict()); assert_same(va, b.val_batches()['web'])
    vdocs = set(docs[:docs.index(split_docs(stream(train), tok)[0])])
    assert len(vdocs) >= 5 and set(split_docs(stream(va), tok)) <= vdocs
    assert not vdocs & set(split_docs(stream(train), tok))

def test_two_ranks_share_no_document_and_skip_none(tmp_path, tok_dir, tok):
    docs = make_docs(41)
    cfg = make_cfg(tok_dir, one_domain(write_jsonl(tmp_path/'d.jsonl', docs)), val_docs=5)  # shuffled
    seen = []
    for rank in (0, 1):
        with PD(cfg, tok, rank=rank, world_size=2) as data:
            assert_same(data.val_batches()['web'], PD(cfg, tok).val_batches()['web'])  # same val everywhere
            got = []
            while data.stats['domains']['web']['epoch'] < 2: got.append(data.next_batch())  # two whole epochs
            seen.append(split_docs(stream(got), tok))
    r0, r1 = set(seen[0]), set(seen[1])
    k = min(docs.index(d) for d in r0 | r1)  # the held-out count: validation takes the first documents
    assert k >= 5 and not r0 & r1, "a document went to both ranks"
    assert r0 | r1 == set(docs[k:]), "a training document went to no rank"
    assert r0 == set(docs[k::2]) and r1 == set(docs[k+1::2])

# ---------------------------------------------------------------- bad input

def test_missing_empty_and_unsupported_files(tmp_path, tok_dir, tok):
    for path, msg in [(tmp_path/'nope.jsonl', 'no such file'), (tmp_path/'*.parquet', 'no files match')]:
        with pytest.raises(DataError, match=msg): PD(make_cfg(tok_dir, one_domain(path)), tok)
    (tmp_path/'empty.jsonl').write_text('')
    with pytest.raises(DataError, match=r'data.domains\[0\].sources\[0\].path: .*empty.jsonl is empty'):
        PD(make_cfg(tok_dir, one_domain(tmp_path/'empty.jsonl')), tok)
    (tmp_path/'x.csv').write_text('text\nhello\n')
    with pytest.raises(DataError, match='unsupported file type'): PD(make_cfg(tok_dir, one_domain(tmp_path/'x.csv')), tok)
    write_jsonl(tmp_path/'mix'/'a.jsonl', ['a b c']); (tmp_path/'mix'/'b.txt').write_text('x')
    with pytest.raises(DataError, match='mixes file types'): PD(make_cfg(tok_dir, one_domain(tmp_path/'mix')), tok)

@pytest.mark.parametrize('ext', ['jsonl', 'txt'])
def test_undecodable_bytes_name_the_file(tmp_path, tok_dir, tok, ext):
    good = make_docs(20)
    if ext == 'jsonl':
        write_jsonl(tmp_path/'c'/'a.jsonl', good)
        (tmp_path/'c'/'b.jsonl').write_bytes(b'{"text": "caf\xe9 au lait \xff"}\n')
    else:
        (tmp_path/'c').mkdir()
        for i, t in enumerate(good): (tmp_path/'c'/f'a{i:02d}.txt').write_text(t)
        (tmp_path/'c'/'b.txt').write_bytes(b'caf\xe9 \xff\n')
    cfg = make_cfg(tok_dir, one_domain(tmp_path/'c'))
    with pytest.raises(DataError, match=rf'sources\[0\]: .*b\.{ext}: not valid UTF-8'):
        with PD(cfg, tok) as data: batches(data, 50)

def test_bad_documents_are_counted_and_logged(tmp_path, tok_dir, tok, caplog):
    p = tmp_path/'d.jsonl'
    lines = [{'text': t} for t in make_docs(30)]
    for i in (2, 9, 20): lines[i] = {'text': '   \n '}
    for i in (5, 25): lines[i] = {'text': None}
    p.write_text(''.join(json.dumps(l) + '\n' for l in lines))
    with caplog.at_level(logging.WARNING, logger='smollm_kit.data'):
        with PD(make_cfg(tok_dir, one_domain(p), val_docs=1, eval_batches=1), tok) as data:
            while data.stats['domains']['web']['epoch'] < 1: data.next_batch()
            sk = data.stats['skipped']
    assert sk['empty'] >= 3 and sk['not_text'] >= 2  # val pass + training pass
    assert any('skipping empty document' in r.message for r in caplog.records)
    assert any('skipping not_text document' in r.message for r in caplog.records)

def test_only_empty_documents_is_an_error(tmp_path, tok_dir, tok):
    p = write_jsonl(tmp_path/'d.jsonl', ['', ' ', '\n'] * 5)
    with pytest.raises(DataError, match='ran out after 15 documents while building the validation set'):
        PD(make_cfg(tok_dir, one_domain(p)), tok)
    p = write_jsonl(tmp_path/'few.jsonl', make_docs(4))  # all four go to validation: nothing left to train on
    cfg = make_cfg(tok_dir, one_domain(p), val_docs=4, eval_batches=1, B=1, seq_len=8)
    with pytest.raises(DataError, match='gave rank 0/1 no training document'):
        with PD(cfg, tok) as data: data.next_batch()

def test_missing_text_field(tmp_path, tok_dir, tok, fake_hub):
    p = write_jsonl(tmp_path/'d.jsonl', make_docs(10))
    with pytest.raises(DataError, match=r"sources\[0\].text_field: no column 'body' .*columns: text"):
        PD(make_cfg(tok_dir, one_domain(p, text_field='body')), tok)
    hub = [{'name': 'gen', 'sources': [{'kind': 'hub', 'path': 'fake/stream', 'text_field': 'body'}]}]
    with pytest.raises(DataError, match=r"text_field: no field 'body' in 'fake/stream' \(fields: text, id\)"):
        PD(make_cfg(tok_dir, hub), tok)

def test_hub_source_is_streamed_with_name_and_split(tok_dir, tok, fake_hub):
    hub = [{'name': 'gen', 'sources': [{'kind': 'hub', 'path': 'fake/stream', 'name': 'sample-10BT', 'split': 'train'}]}]
    with PD(make_cfg(tok_dir, hub), tok) as data: data.next_batch()
    assert fake_hub == [('fake/stream', {'name': 'sample-10BT', 'split': 'train', 'streaming': True})]

def test_hub_dataset_while_offline(tok_dir, tok, monkeypatch):
    hub = [{'name': 'web', 'sources': [{'kind': 'hub', 'path': 'HuggingFaceFW/fineweb-edu', 'name': 'sample-10BT'}]}]
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)  # CI sets it; this test is about the datasets switch
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    def never(*a, **kw): raise AssertionError('datasets asked for a Hub dataset although HF_DATASETS_OFFLINE is set')
    monkeypatch.setattr(datasets, 'load_dataset', never)  # the error comes before any attempt (no retries)
    with pytest.raises(DataError, match=r"sources\[0\]: Hub dataset 'HuggingFaceFW/fineweb-edu' needs the network.*HF_DATASETS_OFFLINE"):
        PD(make_cfg(tok_dir, hub), tok)
    monkeypatch.delenv('HF_DATASETS_OFFLINE')
    monkeypatch.setattr(D, '_hub_unreachable', lambda timeout=3.0: None)  # the probe passes, the download fails
    def offline(*a, **kw): raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, 'load_dataset', offline)
    with pytest.raises(DataError, match=r"cannot open hub dataset 'HuggingFaceFW/fineweb-edu' .*ConnectionError: Couldn't reach"):
        PD(make_cfg(tok_dir, hub), tok)

def test_bad_weights_and_lengths(tmp_path, tok_dir, tok):
    p = write_jsonl(tmp_path/'d.jsonl', make_docs(30))
    two = lambda w1, w2: [{'name': 'a', 'weight': w1, 'sources': [{'kind': 'local', 'path': str(p)}]},
                          {'name': 'b', 'weight': w2, 'sources': [{'kind': 'local', 'path': str(p)}]}]
    cfg = make_cfg(tok_dir, two(1, 1))
    cfg.data.domains[0].weight = -0.5
    with pytest.raises(ConfigError, match=r'data.domains\[0\].weight: must be >= 0'): PD(cfg, tok)
    cfg.data.domains[0].weight = cfg.data.domains[1].weight = 0
    with pytest.raises(ConfigError, match='data.domains: domain weights must sum to something positive'): PD(cfg, tok)
    cfg = make_cfg(tok_dir, two(1, 1)); cfg.data.domains[1].sources[0].weight = 0
    with pytest.raises(ConfigError, match=r'data.domains\[1\].sources: source weights must sum to something positive'): PD(cfg, tok)
    with pytest.raises(ConfigError, match='domain weights must sum'): make_cfg(tok_dir, two(0, 0))  # one rule: the config's
    cfg = make_cfg(tok_dir, two(1, 1)); cfg.train.seq_len = 0
    with pytest.raises(ConfigError, match=r'train.seq_len: must be positive, got 0'): PD(cfg, tok)
    cfg = make_cfg(tok_dir, two(1, 1)); cfg.data.shuffle_buffer = -1
    with pytest.raises(ConfigError, match=r'data.shuffle_buffer: must be >= 0'): PD(cfg, tok)
    with pytest.raises(ConfigError, match='rank 2 / world_size 2'): PD(make_cfg(tok_dir, two(1, 1)), tok, rank=2, world_size=2)

def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, tok_dir, tok):
    cfg = make_cfg(tok_dir, one_domain(write_jsonl(tmp_path/'d.jsonl', make_docs(200))), workers=1)
    with PD(cfg, tok) as data:
        data.next_batch()
        for pid in list(data._feeder.pool._processes): os.kill(pid, signal.SIGKILL)
        with pytest.raises(DataError, match='worker process died'):
            for _ in range(5000): data.next_batch()
