"Tests of smollm_kit.model: shapes and names, document masking, backends, loss, init, input checks, KV cache."
import importlib.util, math
import pytest, torch, torch.nn.functional as F
from smollm_kit.config import ModelConfig, MODEL_PRESETS
from smollm_kit.model import (SmolLM, count_params, pick_attn_backend, attend, AttnContext, attn_context, init_std,
                              doc_segments)

CUDA = torch.cuda.is_available()
SM80 = CUDA and torch.cuda.get_device_capability() >= (8, 0)
HAS_FLASH = importlib.util.find_spec('flash_attn') is not None




def small(**kw):
    "A tiny fp32 model shape with a NoPE layer (layer 1) and GQA 4:2."
    return ModelConfig(**{**dict(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97,
                                 max_seq_len=64, nope_every=2, loss_chunk_size=7), **kw})


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return SmolLM(small(**kw)).eval()


def packed_row(B=2, T=40, seed=1):
    "Random ids and doc ids with several documents of uneven length per row."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, T), generator=g)
    docs = torch.zeros(B, T, dtype=torch.long)
    docs[0, 5:], docs[0, 17:], docs[0, 18:], docs[0, 33:] = 1, 2, 3, 4
    docs[1, 20:] = 7
    return ids, docs


def spans(doc_row):
    "Start/end of each contiguous document in a row."
    cuts = [0] + [i for i in range(1, len(doc_row)) if doc_row[i] != doc_row[i - 1]] + [len(doc_row)]
    return list(zip(cuts[:-1], cuts[1:]))


# --- parameters and structure -------------------------------------------------------------------------------------

def test_count_params_600m_on_meta():
    m = ModelConfig(**MODEL_PRESETS['smollm-600m'])
    c = count_params(m)
    h, L, f, kv = m.d_model, m.n_layers, m.ffn_dim, m.n_kv_heads * m.head_dim
    per_layer = 2*h*h + 2*h*kv + 3*h*f + 2*h  # q, o: h×h; k, v: h×kv (GQA); gate, up, down: h×f; two RMSNorms; no biases
    assert c['non_embedding'] == L * per_layer + h  # + the final norm
    assert c['embedding'] == m.vocab_size * h  # tied: the lm_head is the embedding
    assert c['total'] == c['embedding'] + c['non_embedding']
    assert 580e6 <= c['non_embedding'] <= 620e6  # what the name '600m' promises
    untied = count_params(ModelConfig(**MODEL_PRESETS['smollm-600m'], tie_embeddings=False))
    assert untied['embedding'] == 2 * 32000 * 1536 and untied['non_embedding'] == c['non_embedding']


def test_nope_layers_of_24_layer_model():
    with torch.device('meta'): m = SmolLM(ModelConfig(**MODEL_PRESETS['smollm-600m']))
    assert [i for i, l in enumerate(m.layers) if not l.self_attn.use_rope] == [3, 7, 11, 15, 19, 23]
    with torch.device('meta'): m = SmolLM(ModelConfig(**MODEL_PRESETS['smollm-600m'], nope_every=0))
    assert all(l.self_attn.use_rope for l in m.layers)


@pytest.mark.parametrize('nope_every, invariant', [(1, True), (0, False)])
def test_nope_layer_is_order_blind(nope_every, invariant):
    "Without RoPE, swapping two earlier tokens leaves the last token's output unchanged; with RoPE it changes it."
    m = model(n_layers=1, nope_every=nope_every)
    ids = torch.randint(0, 97, (1, 6))
    swapped = ids[:, [1, 0, 2, 3, 4, 5]]
    with torch.no_grad(): a, b = m(ids)[0, -1], m(swapped)[0, -1]
    assert torch.allclose(a, b, atol=1e-5) == invariant


def test_parameter_names_are_hf_llama():
    m = model()
    keys = set(m.state_dict())
    for i in range(3):
        for k in ('input_layernorm.weight', 'post_attention_layernorm.weight', 'self_attn.q_proj.weight',
                  'self_attn.k_proj.weight', 'self_attn.v_proj.weight', 'self_attn.o_proj.weight',
                  'mlp.gate_proj.weight', 'mlp.up_proj.weight', 'mlp.down_proj.weight'):
            assert f'layers.{i}.{k}' in keys
    assert {'embed_tokens.weight', 'norm.weight', 'lm_head.weight'} <= keys
    assert m.lm_head.weight is m.embed_tokens.weight
    assert not any('bias' in k for k in keys)
    assert m.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)  # GQA: n_kv_heads * head_dim rows
    untied = SmolLM(small(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


# --- document masking and positions -------------------------------------------------------------------------------

def test_doc_positions_restart():
    seg, pos = doc_segments(torch.tensor([[3, 3, 5, 5, 5, 3, 3]]))
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert seg.tolist() == [[0, 0, 1, 1, 1, 2, 2]]  # a reused id further along is a new document


@pytest.mark.parametrize('backend', ['sdpa', 'flex'])
def test_document_isolation_exact(backend):
    "Changing any token of one document leaves every other document's logits bit-identical."
    m = model(attn_backend=backend)
    ids, docs = packed_row()
    with torch.no_grad():
        base = m(ids, docs)
        for b in range(2):
            for s, e in spans(docs[b].tolist()):
                for t in ((s, e - 1) if backend == 'sdpa' else (e - 1,)):  # eager flex on CPU is slow
                    ids2 = ids.clone(); ids2[b, t] = (ids[b, t] + 1) % 97
                    out = m(ids2, docs)
                    assert not torch.equal(out[b, t], base[b, t])
                    keep = torch.ones(ids.shape[1], dtype=torch.bool); keep[s:e] = False
                    assert torch.equal(out[b, keep], base[b, keep]), (b, s, e, t)
                    assert torch.equal(out[1 - b], base[1 - b])


def test_packed_equals_each_document_alone():
    m = model()
    ids, docs = packed_row()
    with torch.no_grad():
        packed = m(ids, docs)
        for b in range(2):
            for s, e in spans(docs[b].tolist()):
                torch.testing.assert_close(packed[b, s:e], m(ids[b:b+1, s:e])[0], atol=1e-5, rtol=1e-5)


def test_doc_ids_none_equals_single_document():
    m = model()
    ids, _ = packed_row()
    with torch.no_grad():
        torch.testing.assert_close(m(ids), m(ids, torch.full_like(ids, 3)), atol=0, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = model(n_kv_heads=2)
    mha = SmolLM(small(n_kv_heads=4)).eval()
    sd = dict(gqa.state_dict())
    for k in list(sd):
        if k.endswith(('k_proj.weight', 'v_proj.weight')):  # (n_kv*hd, d) -> (n_heads*hd, d), head h uses kv head h//2
            sd[k] = sd[k].view(2, 16, 64).repeat_interleave(2, 0).reshape(64, 64)
    mha.load_state_dict(sd)
    ids, docs = packed_row()
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids, docs), mha(ids, docs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)


# --- attention backends -------------------------------------------------------------------------------------------

def reference_attention(q, k, v, seg):
    "Naive document-causal attention on (B, T, H, D) with explicit softmax."
    B, T, H, D = q.shape
    k, v = (t.repeat_interleave(H // t.shape[2], 2) for t in (k, v))
    s = torch.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(D)
    allow = torch.ones(T, T, dtype=torch.bool).tril() & (seg[:, :, None] == seg[:, None, :])
    s = s.masked_fill(~allow[:, None], float('-inf'))
    return torch.einsum('bhqk,bkhd->bqhd', s.softmax(-1), v)


def test_sdpa_causal_fast_path_equals_explicit_mask_and_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 24, 4, 16), torch.randn(2, 24, 2, 16), torch.randn(2, 24, 2, 16)
    cos, sin = torch.ones(1), torch.zeros(1)
    fast = attend(q, k, v, AttnContext('sdpa', cos, sin), 0)
    mask = torch.ones(24, 24, dtype=torch.bool).tril()[None, None].expand(2, 1, 24, 24)
    explicit = attend(q, k, v, AttnContext('sdpa', cos, sin, mask=mask), 0)
    ref = reference_attention(q, k, v, torch.zeros(2, 24, dtype=torch.long))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('backend', ['sdpa', 'flex'])
def test_backend_matches_reference_on_packed_rows(backend):
    torch.manual_seed(0)
    ids, docs = packed_row()
    B, T = ids.shape
    q, k, v = torch.randn(B, T, 4, 16), torch.randn(B, T, 2, 16), torch.randn(B, T, 2, 16)
    with torch.no_grad():
        ctx, _ = attn_context(small(attn_backend=backend), docs, B, T, torch.device('cpu'))
        out = attend(q, k, v, ctx, 0)
    assert ctx.backend == backend
    torch.testing.assert_close(out, reference_attention(q, k, v, doc_segments(docs)[0]), atol=1e-5, rtol=1e-5)


def test_flex_model_matches_sdpa_on_cpu():
    ids, docs = packed_row()
    sd, fx = model(attn_backend='sdpa'), model(attn_backend='flex')
    with torch.no_grad():
        torch.testing.assert_close(fx(ids, docs), sd(ids, docs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fx(ids), sd(ids), atol=1e-5, rtol=1e-5)


def test_flex_without_grad_on_cpu_is_a_clear_error():
    m = model(attn_backend='flex')
    with pytest.raises(ValueError, match="no backward on CPU"): m(torch.zeros(1, 4, dtype=torch.long))


def test_pick_attn_backend():
    assert pick_attn_backend('auto', 'cpu')[0] == 'sdpa'
    assert pick_attn_backend('sdpa', 'cpu') == ('sdpa', 'requested')
    assert pick_attn_backend('flex', 'cpu')[0] == 'flex'
    with pytest.raises(ValueError, match="model.attn_backend='flash' is unavailable: .*(not installed|CUDA)"):
        pick_attn_backend('flash', 'cpu')
    with pytest.raises(ValueError, match="expected one of"): pick_attn_backend('xformers', 'cpu')
    name, reason = pick_attn_backend('auto', 'cpu')
    assert 'flash' in reason and 'flex' in reason  # says why the faster ones were not picked
    assert model().attn_backend == 'sdpa' and model().attn_backend_reason == reason


@pytest.mark.skipif(HAS_FLASH, reason='flash_attn is installed')
def test_flash_requested_without_package_fails_at_construction():
    with pytest.raises(ValueError, match="flash_attn package is not installed"): SmolLM(small(attn_backend='flash'))


@pytest.mark.skipif(not SM80, reason='needs a CUDA GPU with sm80+')
@pytest.mark.parametrize('backend', ['flex', 'flash'])
def test_gpu_backend_matches_sdpa_bf16(backend):
    if backend == 'flash' and not HAS_FLASH: pytest.skip('flash_attn not installed')
    ids, docs = packed_row(B=4, T=64)
    ref = model(attn_backend='sdpa').cuda()
    other = model(attn_backend=backend).cuda()
    assert other.attn_backend == backend
    ids, docs = ids.cuda(), docs.cuda()
    with torch.autocast('cuda', torch.bfloat16):
        a, b = ref(ids, docs).float(), other(ids, docs).float()
        la, lb = ref(ids, docs, targets=ids), other(ids, docs, targets=ids)
    torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    lb.backward()
    torch.testing.assert_close(la, lb, atol=1e-2, rtol=1e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in other.parameters())


@pytest.mark.skipif(not CUDA, reason='needs CUDA')
def test_auto_on_cuda_picks_a_fast_backend():
    name, reason = pick_attn_backend('auto', 'cuda')
    if SM80: assert name in ('flash', 'flex'), reason
    else: assert name == 'sdpa'


# --- loss ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('chunk', [1, 7, 40, 1000])
def test_chunked_loss_equals_plain_cross_entropy(chunk):
    m = model(loss_chunk_size=chunk).train()
    ids, docs = packed_row()
    labels = ids.roll(-1, 1); labels[:, -1] = -100; labels[docs != docs.roll(-1, 1)] = -100; labels[0, :4] = -100
    loss = m(ids, docs, targets=labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = F.cross_entropy(m(ids, docs).float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters(): torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_loss_without_labelled_tokens_is_zero_not_nan():
    m = model()
    ids = torch.randint(0, 97, (1, 8))
    loss = m(ids, targets=torch.full_like(ids, -100))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


def test_loss_does_not_keep_chunk_logits_for_backward():
    "The loss saves gradients of hidden states and head weight for backward, never (chunk, vocab) logits."
    m = model(vocab_size=4096, loss_chunk_size=128).train()
    ids = torch.randint(0, 4096, (8, 64))  # 512 tokens, 4 chunks
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        m(ids, targets=ids)
    assert m.cfg.vocab_size * m.cfg.d_model < 128 * 4096  # the weight gradient is smaller than one chunk of logits
    assert max(saved) < 128 * 4096, max(saved)  # no logits-sized tensor is saved


# --- init ---------------------------------------------------------------------------------------------------------

def test_init_statistics():
    cfg = small(d_model=256, n_heads=4, n_kv_heads=2, ffn_dim=768, vocab_size=4096)
    torch.manual_seed(0)
    m = SmolLM(cfg)
    std = 0.5 / math.sqrt(256)
    assert init_std(cfg) == std
    for n, p in m.named_parameters():
        if p.ndim == 2:  # truncation at 3 std shrinks the std by ~1.3%
            assert abs(p.std().item() - 0.987 * std) < 0.03 * std, n
            assert p.abs().max().item() <= 3 * std + 1e-7, n
            assert abs(p.mean().item()) < 0.05 * std, n
        else: assert torch.equal(p, torch.ones_like(p)), n
    assert abs(m.embed_tokens.weight.std().item() - 0.987 * std) < 0.01 * std
    m2 = SmolLM(small(init_std=0.02))
    assert abs(m2.layers[0].mlp.up_proj.weight.std().item() - 0.987 * 0.02) < 0.002


def test_embed_scale_multiplies_embedding_output():
    ids = torch.randint(0, 97, (1, 5))
    captured = []
    for scale in (True, False):
        m = model(embed_scale=scale)
        m.layers[0].register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        with torch.no_grad(): m(ids)
    torch.testing.assert_close(captured[0], captured[1] * 8.0)  # sqrt(d_model=64)


# --- inputs -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, match', [
    (dict(input_ids=torch.tensor([[1, 97]])), 'input_ids: token id 97 is out of range'),
    (dict(input_ids=torch.tensor([[-3, 2]])), 'input_ids: token id -3 is out of range'),
    (dict(input_ids=torch.zeros(1, 65, dtype=torch.long)), 'exceeds model.max_seq_len=64'),
    (dict(input_ids=torch.zeros(1, 4)), 'input_ids: expected an integer tensor'),
    (dict(input_ids=torch.zeros(4, dtype=torch.long)), r'input_ids: expected shape \(batch, seq_len\)'),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), r'input_ids: expected shape'),
    (dict(input_ids=[[1, 2]]), 'input_ids: expected an integer tensor'),
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), doc_ids=torch.zeros(2, 3, dtype=torch.long)), r'doc_ids: expected shape \(2, 4\)'),
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), doc_ids=torch.zeros(2, 4)), 'doc_ids: expected an integer tensor'),
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), targets=torch.zeros(2, 5, dtype=torch.long)), 'targets: expected shape'),
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), targets=torch.full((2, 4), 97)), 'targets: 8 values are neither -100'),
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), targets=torch.full((2, 4), -1)), 'targets: 8 values'),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match): model()(**kwargs)


def test_int32_and_uint8_ids_are_accepted():
    m = model()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(m(ids.int(), torch.zeros_like(ids).int()), m(ids))
        torch.testing.assert_close(m(ids.to(torch.uint8)), m(ids))


# --- activation checkpointing -------------------------------------------------------------------------------------

def test_activation_checkpointing_gives_identical_grads():
    ids, docs = packed_row()
    grads = []
    for ckpt in (False, True):
        m = model().train().set_activation_checkpointing(ckpt)
        m(ids, docs, targets=ids).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads): assert torch.equal(a, b)


def test_activation_checkpointing_saves_less():
    ids = torch.randint(0, 97, (4, 64))
    def saved_numel(ckpt):
        m = model(n_layers=3).train().set_activation_checkpointing(ckpt)
        n = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.append(t.numel()) or t, lambda t: t): m(ids, targets=ids)
        return sum(n)
    assert saved_numel(True) < 0.5 * saved_numel(False)


# --- KV cache -----------------------------------------------------------------------------------------------------

def test_cache_decoding_matches_full_forward_with_padding_and_nope():
    "Left-padded rows (padding is its own document) decoded token by token equal the full forward."
    m = model(nope_every=2)
    ids = torch.randint(0, 97, (2, 14))
    docs = torch.zeros(2, 14, dtype=torch.long); docs[1, :5] = -1  # row 1: 5 pad tokens, then its prompt
    with torch.no_grad():
        full = m(ids, docs)
        cache = m.new_cache(2, 14)
        outs = [m(ids[:, :6], docs[:, :6], cache=cache)] + [m(ids[:, i:i+1], docs[:, i:i+1], cache=cache) for i in range(6, 14)]
        alone = m(ids[1:, 5:])  # row 1 without its padding
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[1, 5:], alone[0], atol=1e-5, rtol=1e-5)
    assert cache.len == 14 and cache.last[2].tolist() == [13, 8]  # positions of the last tokens
    assert cache.k[0].shape == (2, 2, 14, 16)  # sized by n_kv_heads


def test_cache_errors():
    m = model()
    cache = m.new_cache(1, 4)
    with pytest.raises(ValueError, match='do not fit the KV cache'): m(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match='targets: not supported together with a KV cache'):
        m(torch.zeros(1, 2, dtype=torch.long), targets=torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match='batch size 2 does not match'): m(torch.zeros(2, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match='exceeds model.max_seq_len'): m.new_cache(1, 65)


def test_chunked_loss_under_bf16_autocast_matches_plain():
    "Mixed precision: the fused loss feeds the matmul what autocast would and keeps the log-softmax in fp32."
    m = model(loss_chunk_size=16).train()
    ids = torch.randint(0, 97, (2, 64))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = m(ids, targets=ids)
        loss.backward()
        g = m.embed_tokens.weight.grad.clone(); m.zero_grad()
        ref = F.cross_entropy(m(ids).float().flatten(0, 1), ids.flatten())
        ref.backward()
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(g, m.embed_tokens.weight.grad, atol=2e-3, rtol=5e-2)
