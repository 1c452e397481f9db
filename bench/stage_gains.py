"""What each post-training stage buys: held-out metrics before -> after, on the offline demo data, on this machine.

    python bench/stage_gains.py sft                       # pretrain `tiny` (150 steps), then SFT with `sft-tiny`
    python bench/stage_gains.py sft --pretrained runs/tiny --set train.epochs=1
    python bench/stage_gains.py dpo --init-from runs/sft-tiny    # DPO (dpo-tiny) of an SFT demo model
    python bench/stage_gains.py rlvr --init-from runs/sft-tiny   # RLVR (rlvr-tiny) of an SFT/DPO demo model

Each stage is one sub-command: a function `bench_<stage>(args) -> list of table rows` and `add_<stage>_args(parser)`,
registered in `COMMANDS`. The shared pieces (a pretrained starting point, the run directories, the table) are here.
Numbers depend on the machine's threads and the seed; the table is the evidence, not a test."""
import argparse, importlib, math, sys, tempfile, time
from pathlib import Path

def work_dir(args)->Path:
    d = Path(args.out or tempfile.mkdtemp(prefix='stage_gains-'))
    d.mkdir(parents=True, exist_ok=True)
    return d

def timed(stage:str, cfg):
    "Run `smollm_kit.<stage>.<stage>(cfg)` and say how long it took."
    t0 = time.perf_counter()
    res = getattr(importlib.import_module(f'smollm_kit.{stage}'), stage)(cfg)
    print(f"{stage} ({cfg.run.name}): {res.step} steps, {res.tokens:,} tokens in {time.perf_counter() - t0:.0f}s -> {res.run_dir}", flush=True)
    return res

def stage_config(args, run_dir:Path, src:Path):
    "The benchmarked stage's config: --config in a fresh `run_dir`, starting from `src`, with the --set overrides."
    from smollm_kit import load_config
    return load_config(args.config, {'run.run_dir': str(run_dir), 'run.init_from': str(src), 'logging.progress': False,
                                     'checkpoint.resume': 'never', **overrides(args.set)})

def pretrained_run(args, out:Path)->Path:
    "The run to start from: --pretrained, or a fresh `tiny` pretraining run in `out/pretrain` (reused if finished)."
    if args.pretrained: return Path(args.pretrained)
    from smollm_kit import load_config
    return timed('pretrain', load_config('tiny', {'run.run_dir': str(out/'pretrain'), 'logging.progress': False})).run_dir

def overrides(pairs:list[str])->dict:
    from smollm_kit.config import parse_override
    return dict(parse_override(s) for s in pairs or [])

def print_table(title:str, rows:list[tuple]):
    "rows: (metric, before, after); prints a markdown table with the change."
    print(f"\n### {title}\n\n| metric | before | after | change |\n|---|---|---|---|")
    for name, b, a in rows:
        f = lambda x: '—' if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"
        d = f"{a - b:+.4g}" if None not in (a, b) else '—'
        print(f"| {name} | {f(b)} | {f(a)} | {d} |")

# -- sft ---------------------------------------------------------------------------------------------------------------

def add_sft_args(p:argparse.ArgumentParser):
    p.add_argument('--config', default='sft-tiny', help='SFT preset or YAML (default: sft-tiny)')

def bench_sft(args)->list[tuple]:
    "Pretrain (or reuse) a tiny model, fine-tune it on the demo chat set, compare held-out metrics before and after."
    out = work_dir(args)
    pre = pretrained_run(args, out)
    cfg = stage_config(args, out/'sft', pre)
    res = timed('sft', cfg)
    b, a = res.first_eval, res.metrics
    keys = ['val/exact_match', 'val/format_acc', 'val/loss'] + sorted(k for k in a if k.startswith(('val/exact_match/', 'val/format_acc/')))
    rows = [(k, b.get(k), a.get(k)) for k in keys if k in a]
    print_table(f"SFT ({args.config}) from {pre}: {cfg.sft.val_examples} held-out chats, "
                f"{min(cfg.sft.eval_generations, cfg.sft.val_examples)} replies graded", rows)
    return rows

# -- rlvr --------------------------------------------------------------------------------------------------------------

def add_rlvr_args(p:argparse.ArgumentParser):
    p.add_argument('--config', default='rlvr-tiny', help='RLVR preset or YAML (default: rlvr-tiny)')
    p.add_argument('--init-from', default=None, help='the SFT (or DPO) run to improve (default: pretrain tiny + sft-tiny in --out)')

def sft_run(args, out:Path)->Path:
    "The model RLVR starts from: --init-from, or `sft-tiny` on a pretrained tiny model in `out/sft` (reused if finished)."
    if args.init_from: return Path(args.init_from)
    from smollm_kit import load_config
    from smollm_kit.export import find_valid
    if find_valid(out/'sft') is not None: return out/'sft'
    pre = pretrained_run(args, out)
    return timed('sft', load_config('sft-tiny', {'run.run_dir': str(out/'sft'), 'run.init_from': str(pre), 'logging.progress': False})).run_dir

def bench_rlvr(args)->list[tuple]:
    "RLVR on the offline arithmetic demo from an SFT/DPO demo model: held-out greedy pass@1 before and after."
    from smollm_kit.monitor import read_metrics
    out = work_dir(args)
    src = sft_run(args, out)
    cfg = stage_config(args, out/'rlvr', src)
    res = timed('rlvr', cfg)
    b, a = res.first_eval, res.metrics
    rows = [(k, b.get(k), a.get(k)) for k in ('val/pass@1', 'val/reward', 'val/completion_len') if k in a]
    r = [x['train/reward'] for x in read_metrics(res.run_dir)[0] if 'train/reward' in x]
    k = max(1, len(r) // 4)
    if r: rows.append((f'train/reward (mean of first / last {k} steps)', sum(r[:k]) / k, sum(r[-k:]) / k))
    print_table(f"RLVR ({args.config}, {cfg.rlvr.loss_type}, G={cfg.rlvr.num_generations}, {res.step} steps) from {src}: "
                f"{cfg.rlvr.val_examples} held-out prompts, greedy", rows)
    return rows

# -- dpo ---------------------------------------------------------------------------------------------------------------

def add_dpo_args(p:argparse.ArgumentParser):
    p.add_argument('--config', default='dpo-tiny', help='DPO preset or YAML (default: dpo-tiny)')
    p.add_argument('--init-from', default=None, help='the SFT run to tune (default: pretrain tiny + sft-tiny in --out)')

def dpo_heldout(model, tokenizer, cfg, records:list[dict])->dict:
    "Ranking accuracy of the model's own summed log-probs (chosen > rejected) on held-out pairs, overall and per kind."
    import torch
    dpo = importlib.import_module('smollm_kit.dpo')
    pairs, _ = dpo.prepare_pairs(records, tokenizer, cfg.dpo.max_length or cfg.train.seq_len // 2)
    win, pos, order = torch.zeros(len(pairs)), 0, list(range(len(pairs)))
    with torch.no_grad():
        while pos < len(order):
            b, pos = dpo.pack_pairs(pairs, order, pos, cfg.train.seq_len, cfg.train.micro_batch_size)
            c, r = dpo.sequence_logps(model.eval(), b)
            win[b['pair_idx']] = (c > r).float()
    out = {'held-out log-prob ranking accuracy': win.mean().item()}
    for k in sorted({x.get('kind') for x in records if x.get('kind')}):
        idx = [i for i, x in enumerate(records) if x.get('kind') == k]
        out[f'  … rejected {k}'] = win[idx].mean().item()
    return out

def bench_dpo(args)->list[tuple]:
    """DPO on the demo preference set from the SFT demo model: held-out preference ranking before and after, and the
    SFT demo's held-out exact match / format accuracy (greedy replies), which must not collapse."""
    from smollm_kit import load_config, load_model
    dpo, sft = importlib.import_module('smollm_kit.dpo'), importlib.import_module('smollm_kit.sft')
    out = work_dir(args)
    src = sft_run(args, out)
    cfg = stage_config(args, out/'dpo', src)
    _, val = dpo.demo_preferences(cfg.dpo.demo_pairs, cfg.dpo.val_examples, cfg.run.seed)   # what the stage holds out
    chats = [r for _, r in sft.sft_records(load_config('sft-tiny'))[1] if r.get('answer')]
    def measure(path):
        model, tok = load_model(path)
        tok = sft.ensure_chat_format(tok, model)
        m = dpo_heldout(model, tok, cfg, val)
        rm, _ = sft.reply_metrics(model, tok, chats, max_new_tokens=32)
        return {**m, 'SFT demo val/exact_match': rm['val/exact_match'], 'SFT demo val/format_acc': rm['val/format_acc']}
    before = measure(src)
    res = timed('dpo', cfg)
    after = measure(res.run_dir)
    rows = [(k, before[k], after[k]) for k in before]
    # implicit rewards are 0 for every pair before the first step (policy == reference): no "before" to compare
    rows += [(k, None, res.metrics.get(k)) for k in ('val/rewards/accuracies', 'val/rewards/margins', 'val/loss')]
    print_table(f"DPO ({args.config}: {cfg.dpo.loss_type}, beta {cfg.dpo.beta}, AdamW lr {cfg.optim.adamw_lr}, {res.step} steps) "
                f"from {src}: {len(val)} held-out preference pairs, {len(chats)} held-out SFT chats", rows)
    return rows

COMMANDS = {'sft': (add_sft_args, bench_sft), 'dpo': (add_dpo_args, bench_dpo), 'rlvr': (add_rlvr_args, bench_rlvr)}

def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = ap.add_subparsers(dest='stage', required=True)
    for name, (add_args, _) in COMMANDS.items():
        p = sub.add_parser(name)
        p.add_argument('--pretrained', default=None, help='start from this pretrained run/checkpoint instead of pretraining tiny')
        p.add_argument('--out', default=None, help='directory for the runs (default: a new temporary directory)')
        p.add_argument('--set', action='append', default=[], help='override a config field of the stage, e.g. train.epochs=1')
        p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch decides)')
        add_args(p)
    args = ap.parse_args(argv)
    if args.threads:
        import torch; torch.set_num_threads(args.threads)
    COMMANDS[args.stage][1](args)
    return 0

if __name__ == '__main__': sys.exit(main())
