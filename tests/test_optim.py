"Parameter grouping, Muon LR multipliers, exact resume of the optimizer, and the WSD schedule."
import io, math
import pytest, torch
from torch import nn
from smollm_kit.config import OptimConfig, ScheduleConfig, load_config
from smollm_kit import optim
from smollm_kit.optim import build_optimizer, param_table, format_param_table, wsd_factor, muon_lr_mult


class Block(nn.Module):
    def __init__(self, d, kv, f):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.self_attn = nn.Module()
        for n, o in dict(q_proj=d, k_proj=kv, v_proj=kv, o_proj=d).items(): setattr(self.self_attn, n, nn.Linear(d, o, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)


class ToyLM(nn.Module):
    "Same parameter names as smollm_kit.model.SmolLM (HF Llama naming)."
    def __init__(self, vocab=64, d=16, kv=8, f=48, n_layers=2, tie=True):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, kv, f) for _ in range(n_layers))
        self.norm, self.lm_head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)
        if tie: self.lm_head.weight = self.embed_tokens.weight

    def forward(self, x):
        h = self.embed_tokens(x)
        for b in self.layers:
            a, at = b.input_layernorm(h), b.self_attn
            h = h + at.o_proj(at.q_proj(a) * torch.cat([at.k_proj(a), at.v_proj(a)], -1))
            m = b.post_attention_layernorm(h)
            h = h + b.mlp.down_proj(nn.functional.silu(b.mlp.gate_proj(m)) * b.mlp.up_proj(m))
        return self.lm_head(self.norm(h))


def loss_of(model, x):
    return nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def groups_by_id(opt):
    return {id(p): g['name'] for g in opt.param_groups for p in g['params']}


@pytest.mark.parametrize('tie', [True, False])
def test_every_parameter_in_exactly_one_group(tie):
    m = ToyLM(tie=tie)
    opt = build_optimizer(m, OptimConfig(muon_lr=0.02, adamw_lr=3e-3, embed_lr=1e-2))
    ids = [id(p) for g in opt.param_groups for p in g['params']]
    assert len(ids) == len(set(ids)), "a tensor is in two groups"
    assert set(ids) == {id(p) for p in m.parameters()}
    by_id = groups_by_id(opt)
    assert by_id[id(m.embed_tokens.weight)] == 'embed'
    assert by_id[id(m.lm_head.weight)] == 'embed'  # tied: the same tensor; untied: its own AdamW entry
    assert by_id[id(m.norm.weight)] == 'adamw'
    assert by_id[id(m.layers[1].post_attention_layernorm.weight)] == 'adamw'
    assert all(by_id[id(p)] == 'muon' for n, p in m.layers.named_parameters() if p.ndim == 2)
    assert len([g for g in opt.param_groups if g['name'] == 'embed'][0]['params']) == (1 if tie else 2)
    lr = {g['name']: (g['lr'], g['weight_decay']) for g in opt.param_groups}
    assert lr == {'muon': (0.02, 0.0), 'embed': (1e-2, 0.0), 'adamw': (3e-3, 0.0)}
    assert isinstance(opt.optimizers['muon'], torch.optim.Muon) and isinstance(opt.optimizers['adamw'], torch.optim.AdamW)


def test_frozen_parameters_are_left_out():
    m = ToyLM()
    m.norm.weight.requires_grad_(False)
    opt = build_optimizer(m, OptimConfig())
    assert id(m.norm.weight) not in groups_by_id(opt)
    assert 'norm.weight' not in [r['name'] for r in param_table(m, OptimConfig())]


def test_embed_lr_defaults_to_adamw_lr_and_weight_decay_only_on_muon():
    opt = build_optimizer(ToyLM(), OptimConfig(adamw_lr=4e-3, embed_lr=None, weight_decay=0.1))
    wd = {g['name']: (g['lr'], g['weight_decay']) for g in opt.param_groups}
    assert wd['embed'] == (4e-3, 0.0) and wd['adamw'] == (4e-3, 0.0) and wd['muon'][1] == 0.1


@pytest.mark.parametrize('impl', ['kit', 'torch'])
def test_effective_muon_lr_multiplier_matches_shape_rule(impl, monkeypatch):
    "Measure each matrix's actual step against Muon's orthogonalised update: ratio = sqrt(max(1, fan_out/fan_in))."
    from torch.optim._muon import _zeropower_via_newtonschulz  # the orthogonalisation torch's Muon applies (bf16)
    if impl == 'torch': monkeypatch.setattr(optim, 'Muon', torch.optim.Muon)  # torch's own step, as used on CUDA
    ns = _zeropower_via_newtonschulz if impl == 'torch' else optim.newton_schulz
    torch.manual_seed(0)
    m = ToyLM(d=32, kv=16, f=96)
    lr = 0.01
    opt = build_optimizer(m, OptimConfig(muon_lr=lr, weight_decay=0.0, muon_momentum=0.9))
    assert type(opt.optimizers['muon']) is (torch.optim.Muon if impl == 'torch' else optim.Muon)
    muon = opt.optimizers['muon'].param_groups[0]
    loss_of(m, torch.randint(0, 64, (2, 9))).backward()
    before = {id(p): p.detach().clone() for p in muon['params']}
    grads = {id(p): p.grad.clone() for p in muon['params']}
    opt.step()
    seen = set()
    for p in muon['params']:
        g, mom = grads[id(p)], muon['momentum']
        upd = g.lerp(torch.zeros_like(g).lerp(g, 1 - mom), mom)  # first Nesterov step from a zero buffer
        o = ns(upd, muon['ns_coefficients'], muon['ns_steps'], muon['eps']).float()
        delta = before[id(p)] - p.detach()
        eff = (delta * o).sum() / (lr * (o * o).sum())
        expect = math.sqrt(max(1, p.shape[0] / p.shape[1]))
        assert eff.item() == pytest.approx(expect, rel=1e-3), (tuple(p.shape), eff.item())
        seen.add(round(expect, 3))
    assert seen == {1.0, round(math.sqrt(3), 3)}  # gate/up (96x32) get sqrt(3); the rest 1
    rows = {r['name']: r for r in param_table(m, OptimConfig(muon_lr=lr))}
    assert rows['layers.0.mlp.up_proj.weight']['effective_lr'] == pytest.approx(lr * math.sqrt(3))
    assert rows['layers.0.self_attn.k_proj.weight']['lr_mult'] == 1.0  # 16x32: narrowing, no boost


def test_600m_shapes_multipliers():
    assert muon_lr_mult((4096, 1536)) == pytest.approx(1.633, abs=1e-3)  # gate/up
    assert muon_lr_mult((1536, 4096)) == 1.0 and muon_lr_mult((512, 1536)) == 1.0 and muon_lr_mult((1536, 1536)) == 1.0


def test_table_collapses_layers_and_counts():
    m = ToyLM(n_layers=3)
    txt = format_param_table(param_table(m, OptimConfig()))
    line = [l for l in txt.splitlines() if 'layers.*.mlp.up_proj.weight' in l][0]
    assert line.split()[3] == '3'  # count column
    assert 'embed_tokens.weight = lm_head.weight' in txt
    n_muon = sum(p.numel() for n, p in m.named_parameters() if n.startswith('layers.') and p.ndim == 2)
    assert f"{n_muon:,} parameters" in txt


def train(m, opt, batches, total, sched):
    for i, x in batches:
        opt.set_lr_factor(wsd_factor(i, total, sched))
        loss_of(m, x).backward()
        opt.step(); opt.zero_grad(set_to_none=True)


def test_save_load_step_is_bitwise_identical(tmp_path):
    cfg, sched = OptimConfig(weight_decay=0.01), ScheduleConfig(warmup_steps=2, decay_frac=0.5)
    g = torch.Generator().manual_seed(1)
    batches = [(i, torch.randint(0, 64, (3, 10), generator=g)) for i in range(8)]
    torch.manual_seed(0)
    a = ToyLM()
    init = {k: v.clone() for k, v in a.state_dict().items()}
    opt_a = build_optimizer(a, cfg)
    train(a, opt_a, batches[:4], 8, sched)
    torch.save({'model': a.state_dict(), 'optim': opt_a.state_dict()}, tmp_path/'ck.pt')
    train(a, opt_a, batches[4:], 8, sched)  # uninterrupted run

    b = ToyLM()
    b.load_state_dict(init)  # a fresh process would start from different weights; the checkpoint overwrites them
    ck = torch.load(tmp_path/'ck.pt', weights_only=True)
    b.load_state_dict(ck['model'])
    opt_b = build_optimizer(b, cfg)
    opt_b.load_state_dict(ck['optim'])
    train(b, opt_b, batches[4:], 8, sched)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    # and the comparison can fail: a resume without optimizer state drifts
    c = ToyLM(); c.load_state_dict(ck['model'])
    train(c, build_optimizer(c, cfg), batches[4:], 8, sched)
    assert not torch.equal(a.layers[0].mlp.up_proj.weight, c.layers[0].mlp.up_proj.weight)


def test_load_state_dict_keeps_configured_hyperparameters():
    m = ToyLM()
    opt = build_optimizer(m, OptimConfig(muon_lr=0.02))
    loss_of(m, torch.randint(0, 64, (2, 8))).backward(); opt.step()
    buf = io.BytesIO(); torch.save(opt.state_dict(), buf); buf.seek(0)
    opt2 = build_optimizer(m, OptimConfig(muon_lr=0.01))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    g = opt2.optimizers['muon'].param_groups[0]
    assert g['base_lr'] == 0.01 and g['lr'] == 0.01
    assert torch.equal(opt2.optimizers['muon'].state[g['params'][0]]['momentum_buffer'],
                       opt.optimizers['muon'].state[g['params'][0]]['momentum_buffer'])


def test_load_state_dict_rejects_other_model():
    sd = build_optimizer(ToyLM(tie=False), OptimConfig()).state_dict()
    opt = build_optimizer(nn.Sequential(nn.Linear(4, 4)), OptimConfig())  # no blocks: AdamW only
    with pytest.raises(ValueError, match="optimizer state: expected parts"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize('shape', ['linear', '1-sqrt'])
@pytest.mark.parametrize('min_lr', [0.0, 0.1])
def test_wsd_boundaries_and_monotonicity(shape, min_lr):
    s = ScheduleConfig(warmup_steps=20, decay_frac=0.25, decay_shape=shape, min_lr_ratio=min_lr)
    T = 200
    f = [wsd_factor(i, T, s) for i in range(T + 1)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == 1.0
    assert all(a < b for a, b in zip(f[:20], f[1:20]))           # warmup strictly increasing
    assert all(v == 1.0 for v in f[19:151])                       # stable through the first decay step (150)
    assert all(a > b for a, b in zip(f[150:T], f[151:T + 1]))    # decay strictly decreasing
    assert f[T] == min_lr and min(f[150:]) >= min_lr
    assert f[T - 1] > min_lr                                      # the last update still learns
    mid = 150 + 25
    assert f[mid] == pytest.approx(min_lr + (1 - min_lr) * (0.5 if shape == 'linear' else 1 - math.sqrt(0.5)))


def test_wsd_edge_cases():
    s = ScheduleConfig(warmup_steps=0, decay_frac=0.0)
    assert [wsd_factor(i, 10, s) for i in (0, 9)] == [1.0, 1.0] and wsd_factor(10, 10, s) == 0.0
    short = ScheduleConfig(warmup_steps=10, decay_frac=0.5, decay_shape='linear')  # warmup and decay overlap
    f = [wsd_factor(i, 10, short) for i in range(10)]
    assert max(f) < 1.0 and f[5] == pytest.approx(min(6 / 10, 1.0))
    with pytest.raises(ValueError, match='total_steps must be positive'):
        wsd_factor(0, 0, s)


def test_tiny_preset_trains():
    cfg = load_config('tiny')
    torch.manual_seed(0)
    m, x = ToyLM(), torch.randint(0, 64, (4, 16))
    opt = build_optimizer(m, cfg.optim)
    l0 = loss_of(m, x).item()
    for i in range(15):
        loss_of(m, x).backward(); opt.step(); opt.zero_grad()
    assert loss_of(m, x).item() < 0.5 * l0


def test_real_model_groups():
    model = pytest.importorskip('smollm_kit.model')
    cfg = load_config('tiny')
    m = model.SmolLM(cfg.model)
    opt = build_optimizer(m, cfg.optim)
    ids = [id(p) for g in opt.param_groups for p in g['params']]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.parameters() if p.requires_grad}
    by_id = groups_by_id(opt)
    muon = {n for n, p in m.named_parameters() if by_id.get(id(p)) == 'muon'}
    assert len(muon) == 7 * cfg.model.n_layers
    assert by_id[id(m.embed_tokens.weight)] == 'embed'


def test_cpu_muon_matches_torch_muon_over_steps():
    "The fp32 CPU path follows torch's bf16 Muon (momentum, Nesterov, weight decay, multiplier) up to bf16 rounding."
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 96), (48, 48)]
    ws = [torch.randn(s) * 0.1 for s in shapes]
    ref, ours = [[nn.Parameter(w.clone()) for w in ws] for _ in range(2)]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn='original')
    o_ref, o_ours = torch.optim.Muon(ref, **kw), optim.Muon(ours, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ref, ours): a.grad = b.grad = torch.randn(a.shape, generator=g)
        o_ref.step(); o_ours.step()
    for a, b, w in zip(ref, ours, ws):
        da, db = (a - w).detach().flatten(), (b - w).detach().flatten()
        assert torch.cosine_similarity(da, db, 0) > 0.99 and abs(db.norm() / da.norm() - 1) < 0.03
    # and the state is interchangeable: a torch-Muon checkpoint loads into the kit's Muon
    o2 = optim.Muon([nn.Parameter(w.clone()) for w in ws], **kw)
    o2.load_state_dict(o_ref.state_dict())
    assert torch.equal(o2.state_dict()['state'][0]['momentum_buffer'], o_ref.state_dict()['state'][0]['momentum_buffer'])


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in [(64, 16), (16, 64)]:
        o = optim.newton_schulz(torch.randn(shape), (3.4445, -4.775, 2.0315), 5, 1e-7)
        sv = torch.linalg.svdvals(o)
        assert o.shape == shape and o.dtype == torch.float32 and sv.min() > 0.5 and sv.max() < 1.5  # Muon's "roughly orthogonal"
