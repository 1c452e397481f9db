"Export to / import from Hugging Face SmolLM3 and Llama: parity of logits and greedy generation, round trips, refusals."
import argparse, dataclasses, importlib.util, json, shutil, warnings
from pathlib import Path

import pytest, torch, yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          SmolLM3Config, SmolLM3ForCausalLM)

from smollm_kit.checkpoint import CheckpointManager
from smollm_kit.config import CheckpointConfig, ModelConfig, load_config
from smollm_kit.export import ExportError, export_hf, export_main, find_checkpoint, load_model
from smollm_kit.model import SmolLM

TOL = 1e-4


# ---------------------------------------------------------------------------------------------------------- helpers
def tiny_tokenizer(chat_template=None):
    "A 320-token byte-level BPE with bos/eos/pad."
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = ["the quick brown fox jumps over the lazy dog", "export a small model to hugging face and back"] * 20
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=['<|endoftext|>', '<s>', '<pad>'],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>', eos_token='<|endoftext|>', pad_token='<pad>')
    if chat_template: tok.chat_template = chat_template
    return tok


def tiny_cfg(**kw) -> ModelConfig:
    "The `tiny` preset's model (d_model 128, 4 layers, GQA 4:2, vocab 2048), with overrides."
    return dataclasses.replace(load_config('tiny').model, **kw)


def random_model(mc, seed=0):
    "`SmolLM(mc)` with random weights everywhere (norm weights too, so their mapping is checked)."
    torch.manual_seed(seed)
    m = SmolLM(mc)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def save_ckpt(run_dir, model, step=10, tokenizer=True, state_dict=None, chat_template=None, mc=None):
    "Save `model` the way the trainer does (CheckpointManager.save); returns the checkpoint directory."
    mgr = CheckpointManager(run_dir, CheckpointConfig(keep_last=5), async_save=False)
    cfg_yaml = yaml.safe_dump({'model': dataclasses.asdict(mc or model.cfg)})
    path = mgr.save(step, state_dict if state_dict is not None else model.state_dict(), {'step': step}, config_yaml=cfg_yaml,
                    tokenizer=tiny_tokenizer(chat_template) if tokenizer else None)
    mgr.close()
    return path


def hf_logits(d, x):
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad(): return hf, hf(x).logits


def our_greedy(model, ids, n, eos=None):
    "Full-recompute greedy decoding (no KV cache): the reference the cached paths must match."
    ids = ids.clone()
    for _ in range(n):
        with torch.no_grad(): nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if eos is not None and nxt.item() == eos: break
    return ids


# ------------------------------------------------------------------------------------------------------ export parity
VARIANTS = {  # (embed_scale, tie_embeddings, nope_every)
    'recipe': dict(embed_scale=True, tie_embeddings=True, nope_every=4),
    'tied-noscale-nope2': dict(embed_scale=False, tie_embeddings=True, nope_every=2),
    'untied-scale-allrope': dict(embed_scale=True, tie_embeddings=False, nope_every=0),
    'untied-noscale-nope3': dict(embed_scale=False, tie_embeddings=False, nope_every=3, rope_theta=50000.0, norm_eps=1e-6),
}


@pytest.mark.parametrize('name', VARIANTS)
def test_export_logits_match(tmp_path, name):
    mc = tiny_cfg(**VARIANTS[name])
    ours = random_model(mc)
    ckpt = save_ckpt(tmp_path/'run', ours)
    out = export_hf(ckpt, tmp_path/'hf')
    x = torch.randint(0, mc.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    hf, logits = hf_logits(out, x)
    assert type(hf).__name__ == 'SmolLM3ForCausalLM'
    with torch.no_grad(): diff = (logits - ours(x)).abs().max().item()
    assert diff < TOL, f"{name}: max |logits diff| = {diff}"
    c = json.loads((out/'config.json').read_text())
    assert c['model_type'] == 'smollm3' and c['architectures'] == ['SmolLM3ForCausalLM']
    assert c['no_rope_layers'] == [0 if mc.nope_every and (i+1) % mc.nope_every == 0 else 1 for i in range(mc.n_layers)]
    assert c['num_key_value_heads'] == 2 and c['num_attention_heads'] == 4 and c['hidden_size'] == 128
    assert c['rope_theta'] == c['rope_parameters']['rope_theta'] == mc.rope_theta
    assert c['rms_norm_eps'] == mc.norm_eps and c['use_sliding_window'] is False
    # the embedding scale forces an untied export; otherwise the tie is kept
    assert c['tie_word_embeddings'] == (mc.tie_embeddings and not mc.embed_scale)
    keys = set(load_file(out/'model.safetensors'))
    assert ('lm_head.weight' in keys) == (not c['tie_word_embeddings'])
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr() if c['tie_word_embeddings'] else True


def test_export_embed_scale_folded_exactly(tmp_path):
    mc = tiny_cfg()
    ours = random_model(mc)
    out = export_hf(save_ckpt(tmp_path/'run', ours), tmp_path/'hf')
    sd = load_file(out/'model.safetensors')
    assert torch.equal(sd['model.embed_tokens.weight'], ours.embed_tokens.weight * mc.d_model ** 0.5)
    assert torch.equal(sd['lm_head.weight'], ours.embed_tokens.weight)
    x = torch.randint(0, mc.vocab_size, (1, 16))
    _, logits = hf_logits(out, x)
    with torch.no_grad(): assert torch.equal(logits, ours(x))  # same ops in the same order: bit-identical


def test_export_files_tokenizer_and_generation_config(tmp_path):
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
    mc = tiny_cfg()
    out = export_hf(save_ckpt(tmp_path/'run', random_model(mc), chat_template=template), tmp_path/'hf')
    names = {p.name for p in out.iterdir()}
    assert {'config.json', 'model.safetensors', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json'} <= names
    g = json.loads((out/'generation_config.json').read_text())
    src, tok = tiny_tokenizer(), AutoTokenizer.from_pretrained(out)
    assert (g['bos_token_id'], g['eos_token_id'], g['pad_token_id']) == (src.bos_token_id, src.eos_token_id, src.pad_token_id) == (1, 0, 2)
    c = json.loads((out/'config.json').read_text())
    assert (c['bos_token_id'], c['eos_token_id'], c['pad_token_id']) == (1, 0, 2)
    text = "the lazy fox exports a model"
    assert tok(text).input_ids == src(text).input_ids
    assert tok.chat_template == template
    assert tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False) == "<s>user: hi<|endoftext|>"
    assert json.loads((out/'tokenizer_config.json').read_text())['tokenizer_class'] == 'PreTrainedTokenizerFast'
    assert tok.model_max_length == mc.max_seq_len


def test_export_bf16(tmp_path):
    mc = tiny_cfg()
    ours = random_model(mc)
    out = export_hf(save_ckpt(tmp_path/'run', ours), tmp_path/'hf', dtype='bfloat16')
    assert {t.dtype for t in load_file(out/'model.safetensors').values()} == {torch.bfloat16}
    assert json.loads((out/'config.json').read_text())['dtype'] == 'bfloat16'
    back, _ = load_model(out)
    assert back.cfg == mc and back.lm_head.weight is back.embed_tokens.weight  # tie and scale restored despite rounding
    x = torch.randint(0, mc.vocab_size, (2, 24))
    with torch.no_grad(): assert (back(x) - ours(x)).abs().max() < 0.05


# --------------------------------------------------------------------------------------------------- greedy generation
@pytest.mark.parametrize('name', ['recipe', 'untied-noscale-nope3'])
def test_greedy_generation_matches(tmp_path, name):
    "transformers' greedy `generate` (its KV cache) = our full-recompute loop = our KV-cached `generate_ids`."
    from smollm_kit.generate import generate_ids
    mc = tiny_cfg(**VARIANTS[name])
    ours = random_model(mc, seed=3)
    out = export_hf(save_ckpt(tmp_path/'run', ours), tmp_path/'hf')
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    eos, n, g = hf.generation_config.eos_token_id, 24, torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, mc.vocab_size, (1, L), generator=g) for L in (7, 3)]
    news = []
    for prompt in prompts:
        with torch.no_grad(): theirs = hf.generate(prompt, max_new_tokens=n, do_sample=False)
        ref = our_greedy(ours, prompt, n, eos=eos)
        assert theirs.tolist() == ref.tolist()
        assert ref.shape[1] > prompt.shape[1] + 5  # it really generated
        news.append([t for t in ref[0, prompt.shape[1]:].tolist() if t != eos])
    # both prompts in one left-padded batch, through the KV cache
    assert generate_ids(ours, [p[0].tolist() for p in prompts], max_new_tokens=n, temperature=0.0, eos_id=eos) == news


# -------------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize('name', VARIANTS)
def test_round_trip_ours_hf_ours(tmp_path, name):
    mc = tiny_cfg(**VARIANTS[name])
    ours = random_model(mc)
    out = export_hf(save_ckpt(tmp_path/'run', ours), tmp_path/'hf')
    back, tok = load_model(out)
    assert back.cfg == mc  # embed_scale and tie restored from the `smollm_kit` entry
    assert (back.lm_head.weight is back.embed_tokens.weight) == mc.tie_embeddings
    assert not back.training
    # exact, except an untied scaled table: (w·sqrt(d))/sqrt(d) can be 1 ulp off w (tied: lm_head kept w itself)
    inexact = {'embed_tokens.weight'} if mc.embed_scale and not mc.tie_embeddings else set()
    for k, v in ours.state_dict().items():
        if k in inexact: assert torch.allclose(back.state_dict()[k], v, rtol=2e-7, atol=0), k
        else: assert torch.equal(back.state_dict()[k], v), k
    x = torch.randint(0, mc.vocab_size, (2, 32))
    with torch.no_grad(): diff = (back(x) - ours(x)).abs().max().item()
    assert diff < 1e-5 if inexact else diff == 0, diff
    assert tok is not None and tok.eos_token == '<|endoftext|>'


def test_reimport_of_finetuned_export_keeps_logits(tmp_path):
    "An export whose lm_head was trained apart from embed_tokens in HF comes back untied, with the same logits."
    mc = tiny_cfg()
    out = export_hf(save_ckpt(tmp_path/'run', random_model(mc)), tmp_path/'hf')
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad(): hf.lm_head.weight.add_(0.01)
    hf.save_pretrained(tmp_path/'ft')
    with pytest.warns(UserWarning, match='no tokenizer files'): back, _ = load_model(tmp_path/'ft')
    assert back.cfg.embed_scale and not back.cfg.tie_embeddings
    x = torch.randint(0, mc.vocab_size, (2, 20))
    with torch.no_grad(): assert (back(x) - hf(x).logits).abs().max() < TOL


def save_random_hf(model_cls, cfg, d):
    torch.manual_seed(0)
    m = model_cls(cfg).eval()
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return m


HF_SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=0, pad_token_id=2)


@pytest.mark.parametrize('tie', [True, False])
def test_import_hf_llama(tmp_path, tie):
    hf = save_random_hf(LlamaForCausalLM, LlamaConfig(**HF_SHAPE, rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie), tmp_path/'llama')
    ours, tok = load_model(tmp_path/'llama')
    assert (ours.cfg.nope_every, ours.cfg.embed_scale, ours.cfg.tie_embeddings) == (0, False, tie)
    assert ours.cfg.rope_theta == 500000.0 and ours.cfg.norm_eps == 1e-6 and ours.cfg.n_kv_heads == 2
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tie
    x = torch.randint(0, 320, (2, 30))
    with torch.no_grad(): diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < TOL, diff
    assert tok.eos_token_id == 0


def test_import_hf_smollm3_then_export_again(tmp_path):
    hf = save_random_hf(SmolLM3ForCausalLM, SmolLM3Config(**HF_SHAPE, rope_theta=2e6, tie_word_embeddings=True), tmp_path/'s3')
    ours, _ = load_model(tmp_path/'s3')
    assert ours.cfg.nope_every == 4 and ours.cfg.nope_layers() == [3, 7] and not ours.cfg.embed_scale
    x = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max() < TOL
    # and back out through a checkpoint: the kit can fine-tune an existing model and export it again
    ckpt = save_ckpt(tmp_path/'run', ours)
    out = export_hf(ckpt, tmp_path/'again')
    _, logits = hf_logits(out, x)
    assert (logits - ref).abs().max() < TOL
    assert json.loads((out/'config.json').read_text())['tie_word_embeddings'] is True


def test_import_refuses_what_it_cannot_represent(tmp_path):
    def refused(cfg, contains):
        d = tmp_path/f'hf{len(list(tmp_path.iterdir()))}'
        cfg.save_pretrained(d)
        with pytest.raises(ExportError, match=contains): load_model(d)
    refused(SmolLM3Config(**HF_SHAPE, no_rope_layers=[1, 0, 0, 1, 1, 1, 1, 1]), r"NoPE at layers \[1, 2\], which is not 'every k-th layer'")
    refused(SmolLM3Config(**HF_SHAPE, use_sliding_window=True, sliding_window=16), 'use_sliding_window')
    refused(LlamaConfig(**HF_SHAPE, attention_bias=True), 'attention_bias=True cannot be represented')
    refused(LlamaConfig(**HF_SHAPE, rope_scaling={'rope_type': 'linear', 'factor': 2.0}), "RoPE type 'linear'")
    refused(LlamaConfig(**HF_SHAPE, hidden_act='gelu'), "hidden_act='gelu'")
    refused(LlamaConfig(**HF_SHAPE, head_dim=32), 'head_dim=32')
    from transformers import GPT2Config
    refused(GPT2Config(n_layer=2, n_embd=32, n_head=2), "model_type 'gpt2' is not supported")
    # a supported config whose weights are missing
    refused(LlamaConfig(**HF_SHAPE), 'no model.safetensors')


# --------------------------------------------------------------------------------------------- paths and load_model
def test_run_dir_uses_newest_valid_checkpoint(tmp_path):
    mc = tiny_cfg()
    old, new = random_model(mc, seed=1), random_model(mc, seed=2)
    save_ckpt(tmp_path/'run', old, step=10)
    p20 = save_ckpt(tmp_path/'run', new, step=20)
    (tmp_path/'run'/'config.yaml').write_text(yaml.safe_dump({'model': dataclasses.asdict(mc)}))
    assert find_checkpoint(tmp_path/'run') == p20
    x = torch.randint(0, mc.vocab_size, (1, 12))
    m, tok = load_model(tmp_path/'run')
    with torch.no_grad(): assert torch.equal(m(x), new(x))
    out = export_hf(tmp_path/'run', tmp_path/'hf')
    assert json.loads((out/'config.json').read_text())['smollm_kit']['source'] == {'checkpoint': 'step_00000020', 'step': 20}
    # a corrupted newest checkpoint is skipped (with a warning), like resume does
    (p20/'model.safetensors').write_bytes(b'x' * (p20/'model.safetensors').stat().st_size)
    with pytest.warns(UserWarning, match='skipping checkpoint'): m, _ = load_model(tmp_path/'run')
    with torch.no_grad(): assert torch.equal(m(x), old(x))


def test_load_checkpoint_dir_and_missing_tokenizer(tmp_path):
    mc = tiny_cfg()
    ours = random_model(mc)
    ckpt = save_ckpt(tmp_path/'run', ours, tokenizer=False)
    with pytest.warns(UserWarning, match='no tokenizer files; returning tokenizer=None'): m, tok = load_model(ckpt)
    assert tok is None and not m.training and m.cfg == mc
    with torch.no_grad(): x = torch.randint(0, mc.vocab_size, (1, 9)); assert torch.equal(m(x), ours(x))
    with pytest.raises(ExportError, match=r"no tokenizer/ directory; an exported model needs its tokenizer"):
        export_hf(ckpt, tmp_path/'hf')


def test_bad_paths_are_one_line_errors(tmp_path):
    mc = tiny_cfg()
    ckpt = save_ckpt(tmp_path/'run', random_model(mc))
    cases = {
        tmp_path/'missing': 'no such directory; expected a checkpoint directory (with manifest.json) or a run directory',
        ckpt/'config.yaml': 'is a file; expected a checkpoint directory',
        tmp_path: 'expected a checkpoint directory (with manifest.json) or a run directory (with checkpoints/)',
    }
    (tmp_path/'emptyrun'/'checkpoints').mkdir(parents=True)
    cases[tmp_path/'emptyrun'] = 'run directory has no valid checkpoint'
    half = tmp_path/'run'/'checkpoints'/'step_00000099'
    shutil.copytree(ckpt, half); (half/'manifest.json').unlink()
    cases[half] = 'not a valid checkpoint: no manifest.json'
    for path, msg in cases.items():
        for fn in (lambda: export_hf(path, tmp_path/'out'), lambda: load_model(path)):
            with pytest.raises(ExportError) as e: fn()
            assert str(path) in str(e.value) and msg in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_export_refusals(tmp_path):
    mc = tiny_cfg()
    m = random_model(mc)
    # a tensor SmolLM3 has no place for (e.g. a QK-norm the model grew)
    sd = {**m.state_dict(), 'layers.0.self_attn.q_norm.weight': torch.ones(32)}
    bad = save_ckpt(tmp_path/'r1', m, state_dict=sd)
    with pytest.raises(ExportError, match='tensors the SmolLM3 format has no place for: layers.0.self_attn.q_norm.weight'):
        export_hf(bad, tmp_path/'o1')
    # a config that does not match the weights
    mis = save_ckpt(tmp_path/'r2', random_model(tiny_cfg(ffn_dim=256)), mc=mc)
    with pytest.raises(ExportError, match=r'layers.0.mlp.gate_proj.weight has shape \(256, 128\), the config implies \(384, 128\)'):
        export_hf(mis, tmp_path/'o2')
    # a checkpoint edited after it was written
    (good := save_ckpt(tmp_path/'r5', m)).joinpath('config.yaml').write_text(yaml.safe_dump({'model': dataclasses.asdict(mc)}) + '# edited')
    with pytest.raises(ExportError, match='not a valid checkpoint: config.yaml has'):
        export_hf(good, tmp_path/'o2')
    # a tokenizer with more ids than the embedding has rows
    small = random_model(tiny_cfg(vocab_size=300))
    with pytest.raises(ExportError, match='320 tokens but model.vocab_size is 300'):
        export_hf(save_ckpt(tmp_path/'r3', small), tmp_path/'o3')
    # output directories: not over a checkpoint, not into unrelated files; an earlier export may be replaced
    good = save_ckpt(tmp_path/'r4', m)
    with pytest.raises(ExportError, match='is a checkpoint; refusing'): export_hf(good, good)
    (tmp_path/'busy').mkdir(); (tmp_path/'busy'/'notes.txt').write_text('mine')
    with pytest.raises(ExportError, match='exists and is not empty'): export_hf(good, tmp_path/'busy')
    export_hf(good, tmp_path/'o4'); export_hf(good, tmp_path/'o4')
    with pytest.raises(ExportError, match="dtype: expected one of float32, bfloat16, float16, got 'int8'"):
        export_hf(good, tmp_path/'o5', dtype='int8')


# ------------------------------------------------------------------------------------------------------------ CLI, hub
def test_export_main(tmp_path, capsys):
    save_ckpt(tmp_path/'run', random_model(tiny_cfg()))
    rc = export_main(argparse.Namespace(checkpoint=str(tmp_path/'run'), out=str(tmp_path/'hf'), push_to_hub=None))
    assert rc == 0 and (tmp_path/'hf'/'model.safetensors').is_file()
    assert 'step_00000010' in capsys.readouterr().out
    if importlib.util.find_spec('smollm_kit.cli') is not None:
        from smollm_kit.cli import main
        assert main(['export', '--checkpoint', str(tmp_path/'run'), '--out', str(tmp_path/'hf2')]) == 0
        assert main(['export', '--checkpoint', str(tmp_path/'nowhere'), '--out', str(tmp_path/'hf3')]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count('\n') == 0 and 'nowhere: no such directory' in err, err


def test_push_to_hub_uses_huggingface_hub(tmp_path, monkeypatch):
    "The upload goes through huggingface_hub.HfApi (replaced here by a recorder: tests never touch the network)."
    import huggingface_hub
    calls = []
    class FakeApi:
        def create_repo(self, repo_id, **kw): calls.append(('create', repo_id, kw)); return f'https://huggingface.co/{repo_id}'
        def upload_folder(self, **kw): calls.append(('upload', kw['repo_id'], sorted(p.name for p in Path(kw['folder_path']).iterdir())))
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    save_ckpt(tmp_path/'run', random_model(tiny_cfg()))
    export_hf(tmp_path/'run', tmp_path/'hf', push_to_hub='me/tiny-smollm')
    assert calls[0][:2] == ('create', 'me/tiny-smollm') and calls[0][2].get('exist_ok')
    assert calls[1][0] == 'upload' and calls[1][1] == 'me/tiny-smollm' and 'model.safetensors' in calls[1][2]
