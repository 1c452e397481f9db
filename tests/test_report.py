"""`smollm report`: the report card of a tiny pretraining run plus synthetic SFT/DPO/RLVR stages (metrics, plots,
evals beside the reference rows, greedy samples with and without a chat template, RLVR samples.jsonl)."""
import argparse, dataclasses, json, os

import pytest, torch, yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from smollm_kit.checkpoint import CheckpointManager
from smollm_kit.cli import main as cli_main
from smollm_kit.config import CheckpointConfig, ModelConfig, load_config
from smollm_kit.export import load_model
from smollm_kit.generate import encode_prompt, generate_text
from smollm_kit.model import SmolLM
from smollm_kit.monitor import read_metrics
from smollm_kit.pretrain import pretrain
from smollm_kit.report import (PROMPTS, STAGES, add_report_args, find_stages, report_main, sample_generations,
                               stage_summary, write_report)

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["what is the capital of france? paris", "hello there, how are you"] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>', '<s>', '<|im_start|>', '<|im_end|>'],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>', eos_token='<|im_end|>')
    tok.chat_template = CHAT
    return tok


def write_stage(d, stage, records, init_from=None):
    d.mkdir(parents=True, exist_ok=True)
    (d/'config.yaml').write_text(yaml.safe_dump({'run': {'name': stage, 'stage': stage, 'init_from': init_from},
                                                 'train': {'max_steps': 4, 'micro_batch_size': 2, 'grad_accum_steps': 1, 'seq_len': 64}}))
    (d/'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


@pytest.fixture(scope='module')
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp('pipe')
    cfg = load_config('tiny', {'train.max_steps': 4, 'train.eval_every': 2, 'logging.every_steps': 1, 'checkpoint.every_steps': 4,
                               'run.run_dir': str(root/'pretrain')})
    pretrain(cfg)
    # sft: a tiny random model whose tokenizer has a chat template, saved as the trainer saves checkpoints
    torch.manual_seed(0)
    mc = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=300, max_seq_len=96, tie_embeddings=False)
    mgr = CheckpointManager(root/'sft', CheckpointConfig(keep_last=2), async_save=False)
    mgr.save(4, SmolLM(mc).state_dict(), {'step': 4, 'cost': {'elapsed_s': 3725.0, 'usd_spent': 1.25}},
             config_yaml=yaml.safe_dump({'model': dataclasses.asdict(mc)}), tokenizer=chat_tokenizer())
    mgr.close()
    write_stage(root/'sft', 'sft', [{'step': s, 'tokens': 100 * s, 'train/loss': 3.0 - 0.1 * s, **({'val/loss': 3.2 - 0.1 * s} if s % 2 == 0 else {})}
                                    for s in range(1, 5)], init_from=str(root/'pretrain'))
    (root/'sft'/'eval_results.json').write_text(json.dumps({'step': 4, 'metrics': {
        'eval/hellaswag/acc_norm': 0.305, 'eval/arc_easy/acc_norm': 0.5, 'eval/arc_challenge/acc_norm': 0.25, 'eval/toy/acc': 0.75}}))
    # dpo: resumed at step 2, so steps 3-4 were logged twice; the second records are the ones that count
    recs = [{'step': s, 'tokens': 64 * s, 'train/rewards/accuracies': 0.5, 'val/rewards/accuracies': 0.5 + s / 100} for s in range(1, 5)]
    recs += [{'event': 'resume', 'step': 2}] + [{'step': s, 'tokens': 64 * s, 'train/rewards/accuracies': 0.9, 'val/rewards/accuracies': 0.6 + s / 100}
                                                for s in (3, 4)]
    write_stage(root/'dpo', 'dpo', recs)
    write_stage(root/'rlvr', 'rlvr', [{'step': s, 'tokens': 10 * s, 'train/reward': s / 10, 'val/pass@1': s / 8, 'cost/usd_spent': 0.5 * s} for s in range(1, 5)])
    (root/'rlvr'/'samples.jsonl').write_text(''.join(json.dumps({'step': s, 'prompt': 'Q: 2+3=', 'completion': f' {s} done', 'reward': float(s == 5)}) + '\n'
                                                     for s in range(1, 7)))
    return root


def test_pipeline_report(pipe):
    f = write_report(pipe, max_new_tokens=8)
    assert f == pipe/'report.md'
    md = f.read_text()
    for st in STAGES:
        assert f'\n## {st}\n' in md
        png = pipe/f'{st}_curves.png'
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and f'({st}_curves.png)' in md
    recs, _ = read_metrics(pipe/'pretrain')
    last = recs[-1]
    assert f"| pretrain | {last['step']} | {last['tokens']:,} |" in md
    assert f"{last['val/loss']:.4g}" in md and f"{recs[0]['val/loss']:.4g}" in md  # key metric first -> final
    # dpo: values after the resume, not the first records of steps 3-4
    assert '| dpo | 4 | 256 | – | – | val/rewards/accuracies | 0.51 | 0.64 |' in md
    # time and cost: trainer state of the newest checkpoint (sft), else the last cost/usd_spent record (rlvr)
    assert '| sft | 4 | 400 | 1h 02m | $1.25 |' in md and '| rlvr | 4 | 40 | – | $2.00 |' in md
    # evals with the reference rows; every eval metric listed
    assert '| ARC (avg) | 37.5 | 43.9 | 53.0 |' in md and '| HellaSwag | 30.5 | 42.1 | 54.5 |' in md and '| toy | acc | 0.75 |' in md
    # rlvr samples.jsonl: the last three lines
    assert 'Q: 2+3= 6 done' in md and 'Q: 2+3= 4 done' in md and 'Q: 2+3= 3 done' not in md
    # greedy samples from the pretrain checkpoint, as `generate` gives them
    model, tok = load_model(pipe/'pretrain')
    want = generate_text(model, tok, [encode_prompt(tok, PROMPTS[0])], max_new_tokens=8, temperature=0)[0]
    assert f'```text\n{PROMPTS[0]}{want}\n```' in md
    assert md.count('(no checkpoint)') == 2  # dpo, rlvr


def test_samples_use_the_chat_template(pipe):
    model, tok = load_model(pipe/'sft')
    got = sample_generations(pipe/'sft', ['what is the capital of france?'], max_new_tokens=6)
    ids = tok.encode('<|im_start|>user\nwhat is the capital of france?<|im_end|>\n<|im_start|>assistant\n', add_special_tokens=False)
    assert got == [('what is the capital of france?', generate_text(model, tok, [ids], max_new_tokens=6, temperature=0)[0])]


def test_single_run_dir_and_cli(pipe, tmp_path, capsys):
    assert find_stages(pipe/'dpo') == [('dpo', pipe/'dpo')]
    s = stage_summary('pretrain', pipe/'pretrain')
    assert s['checkpoint'].name.startswith('step_') and s['key'] == 'val/loss'
    args = add_report_args(argparse.ArgumentParser()).parse_args([str(pipe/'rlvr'), '--no-samples', '--output', str(tmp_path/'card.md')])
    assert report_main(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path/'card.md')
    md = (tmp_path/'card.md').read_text()
    assert '\n## rlvr\n' in md and '\n## pretrain' not in md and 'Sample generations' not in md
    assert (tmp_path/'rlvr_curves.png').is_file()


def test_bad_directories(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match='no such directory'): write_report(tmp_path/'missing')
    with pytest.raises(ValueError, match='neither a run directory'): write_report(tmp_path)
    (tmp_path/'run').mkdir(); (tmp_path/'run'/'metrics.jsonl').write_text('{"step": 1, "train/loss": 2}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match='metrics.jsonl:2 is not valid JSON'): write_report(tmp_path/'run')
    assert cli_main(['report', str(tmp_path)]) == 2  # one line, no traceback
    assert capsys.readouterr().err.startswith(f"smollm report: error: report: {tmp_path} is neither a run directory")
