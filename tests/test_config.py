"Bad configs must fail with one line that names the offending field."
import subprocess, sys, textwrap
import pytest, yaml
from smollm_kit.config import load_config, ConfigError, list_presets, save_config, MODEL_PRESETS

BAD = [  # (overrides, field the message must name)
    ({'model.n_heads': 5}, 'model.d_model'),                 # 128 % 5
    ({'model.n_kv_heads': 3}, 'model.n_kv_heads'),           # 4 % 3
    ({'model.d_model': 0}, 'model.d_model'),
    ({'model.n_layers': -1}, 'model.n_layers'),
    ({'model.ffn_dim': 0}, 'model.ffn_dim'),
    ({'model.vocab_size': 0}, 'model.vocab_size'),
    ({'model.d_model': 132, 'model.n_heads': 4, 'model.n_kv_heads': 2}, 'model.d_model'),  # head_dim 33 is odd
    ({'model.attn_backend': 'xformers'}, 'model.attn_backend'),
    ({'model.rope_theta': 0}, 'model.rope_theta'),
    ({'model.init_std': -0.1}, 'model.init_std'),
    ({'model.n_layer': 2}, 'model.n_layer'),                 # typo
    ({'optim.muon_lr': 0}, 'optim.muon_lr'),
    ({'optim.adamw_lr': -1e-3}, 'optim.adamw_lr'),
    ({'optim.embed_lr': 0}, 'optim.embed_lr'),
    ({'optim.betas': [0.9]}, 'optim.betas'),
    ({'optim.muon_momentum': 1.5}, 'optim.muon_momentum'),
    ({'optim.grad_clip': -1}, 'optim.grad_clip'),
    ({'optim.muon_lr': 'fast'}, 'optim.muon_lr'),            # wrong type
    ({'schedule.decay_frac': 1.5}, 'schedule.decay_frac'),
    ({'schedule.decay_shape': 'cosine'}, 'schedule.decay_shape'),
    ({'schedule.warmup_steps': -5}, 'schedule.warmup_steps'),
    ({'train.seq_len': 4096}, 'train.seq_len'),              # > model.max_seq_len
    ({'train.micro_batch_size': 0}, 'train.micro_batch_size'),
    ({'train.grad_accum_steps': 1.5}, 'train.grad_accum_steps'),
    ({'train.max_steps': None}, 'train.max_steps'),          # no budget at all
    ({'train.max_steps': 0}, 'train.max_steps'),
    ({'train.precision': 'fp8'}, 'train.precision'),
    ({'train.compile': 'yes'}, 'train.compile'),
    ({'checkpoint.keep_last': 0}, 'checkpoint.keep_last'),
    ({'checkpoint.every_steps': 0}, 'checkpoint.every_steps'),
    ({'checkpoint.resume': 'maybe'}, 'checkpoint.resume'),
    ({'logging.every_steps': 0}, 'logging.every_steps'),
    ({'cost.usd_per_hour': -2}, 'cost.usd_per_hour'),
    ({'data.domains': []}, 'data.domains'),
    ({'data.domains': [{'name': 'web', 'weight': -1, 'sources': [{'kind': 'demo', 'path': 'prose'}]}]}, 'data.domains[0].weight'),
    ({'data.domains': [{'name': 'web', 'weight': 0, 'sources': [{'kind': 'demo', 'path': 'prose'}]}]}, 'data.domains'),
    ({'data.domains': [{'name': 'web', 'weight': 1, 'sources': []}]}, 'data.domains[0].sources'),
    ({'data.domains': [{'name': 'web', 'weight': 1, 'sources': [{'kind': 'ftp', 'path': 'x'}]}]}, 'data.domains[0].sources[0].kind'),
    ({'data.domains': [{'name': 'web', 'weight': 1, 'sources': [{'kind': 'local', 'path': 'a.txt', 'txt_field': 'x'}]}]}, 'data.domains[0].sources[0].txt_field'),
    ({'data.val_docs': 0}, 'data.val_docs'),
    ({'stability.action': 'panic'}, 'stability.action'),
    ({'trian.max_steps': 3}, 'trian'),
]

@pytest.mark.parametrize('overrides,field', BAD, ids=[f[1] + f'-{i}' for i, f in enumerate(BAD)])
def test_bad_config_names_field(overrides, field):
    with pytest.raises(ConfigError) as e: load_config('tiny', overrides)
    msg = str(e.value)
    assert field in msg, msg
    assert '\n' not in msg

def test_at_least_twenty_bad_configs(): assert len(BAD) >= 20

def test_typo_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"): load_config('tiny', {'train.max_step': 3})

def test_presets_load_and_round_trip(tmp_path):
    assert {'tiny', 'pretrain', 'pretrain-135m'} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        save_config(cfg, tmp_path/f'{name}.yaml')
        assert load_config(tmp_path/f'{name}.yaml') == cfg

def test_model_presets_match_recipe():
    m = load_config('pretrain').model
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size, m.max_seq_len) == (1536, 24, 12, 4, 4096, 32000, 2048)
    assert m.tie_embeddings and m.embed_scale and m.nope_layers() == [3, 7, 11, 15, 19, 23]
    s = load_config('pretrain-135m').model
    assert (s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.ffn_dim) == (576, 30, 9, 3, 1536)

def test_reference_batch_is_1_57m_tokens():
    t = load_config('pretrain').train
    assert (t.micro_batch_size, t.grad_accum_steps, t.seq_len) == (48, 16, 2048)
    assert t.tokens_per_step() == 1_572_864 and t.max_tokens == 10_000_000_000

def test_yaml_file_errors(tmp_path):
    (tmp_path/'bad.yaml').write_text('model: [unclosed')
    with pytest.raises(ConfigError, match='not valid YAML'): load_config(tmp_path/'bad.yaml')
    with pytest.raises(ConfigError, match="no preset or file named 'nope.yaml'"): load_config('nope.yaml')
    (tmp_path/'list.yaml').write_text('- 1\n- 2\n')
    with pytest.raises(ConfigError, match='must be a mapping of sections'): load_config(tmp_path/'list.yaml')

def test_cli_overrides_parse_yaml_scalars():
    cfg = load_config('tiny', ['train.max_steps=7', 'optim.muon_lr=3e-3', 'checkpoint.mirror_dir=null', 'train.compile=false'])
    assert cfg.train.max_steps == 7 and cfg.optim.muon_lr == 3e-3 and cfg.checkpoint.mirror_dir is None and cfg.train.compile is False
