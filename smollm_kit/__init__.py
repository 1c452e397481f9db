"""Train a ~600M SmolLM-style language model end to end (pretrain, SFT, DPO, RLVR) on one GPU, notebook first.

Train a ~600M-parameter SmolLM-style language model end to end — **pretrain → SFT → DPO/APO → RLVR** — on one
GPU, with Google Colab as its home. Open `SmolLM_Colab.ipynb`, press *Run all*, watch live loss and cost plots,
lose your runtime, press *Run all* again and carry on from the last checkpoint. Or drive the same code from a
shell (`smollm pretrain --config …`) or a multi-GPU box with `torchrun`.

The kit is an [nbdev](https://nbdev.fast.ai) project: the notebooks in `nbs/` are the source *and* a course.
Read them in order to learn how a modern small LM is trained:

| notebook | what it teaches |
|---|---|
| `00_config` | one typed, validated config for every knob; presets; `--set` overrides |
| `01_model` | RMSNorm, SwiGLU, RoPE + NoPE, GQA, document-masked attention backends, chunked loss |
| `02a_corpus` | the offline demo corpus, made from Python's own standard library |
| `02b_tokenizer` | byte-level BPE, the cached demo tokenizer (with ChatML markers), BOS/EOS handling |
| `02c_data` | sources, a seeded resumable shuffle, domain mixtures, document packing, exact resume |
| `03_optim` | Muon for matrices, AdamW for the rest, the Warmup-Stable-Decay schedule |
| `04_checkpoint` | atomic, rotated, mirrored checkpoints that survive `kill -9` |
| `04a_resume`, `04b_rundir`, `04c_interrupt` | what a run may resume from; one writer per run directory; clean stops on Ctrl-C / `kill` |
| `05_monitor` | FLOPs, MFU, honest cost, loss-spike detection, `metrics.jsonl` |
| `06_trainer` | the one loop every stage shares |
| `06a_distributed` | past one GPU with `torchrun`: DDP or FSDP2, per-rank data positions, distributed Muon |
| `07_pretrain` | the pretraining stage |
| `07a_generate`, `07b_export` | KV-cache generation; Hugging Face SmolLM3 export and import |
| `08_sft` | supervised fine-tuning on chat data: ChatML, assistant-only loss, packed conversations |
| `09_dpo` | preference tuning: DPO, IPO and APO on packed chosen/rejected pairs |
| `10_rlvr`, `10a_verifiers` | reinforcement learning with verifiable rewards (GRPO family); the verifiers |
| `11_pipeline` | pretrain → SFT → DPO/APO → RLVR in one call, each stage starting from the previous |
| `12_eval`, `13_report` | downstream evaluation with lm-evaluation-harness; the report card of a run |
| `14a_colab`, `14b_panel`, `14c_liveplot`, `15_cli` | Colab plumbing (Drive, free space, install pin); the control panel; live plots per stage; the `smollm` command |

## The pipeline

```
sources (HF Hub streams | local files | offline demo data) → tokenizer → mixture / chat template → packer
  → Trainer: one loop for every stage (Muon+AdamW or AdamW, WSD/cosine, autocast, grad accumulation, clipping,
             a token-weighted loss normalised over the whole step, DDP / FSDP2 under torchrun)
      ├─ stages: pretrain (next token) → SFT (assistant tokens) → DPO/APO (pairs, cached reference)
      │          → RLVR (GRPO / Dr. GRPO / DAPO rollouts scored by verifiers)
      ├─ monitors: loss spikes / NaN, throughput & MFU, cost & ETA, memory
      ├─ metrics.jsonl, W&B (optional), live notebook plots
      └─ checkpoints: atomic, rotated, mirrored to Drive, locked, exact resume
  → generate / chat (KV cache) · export (Hugging Face SmolLM3 format) · eval (lm-evaluation-harness) · report
```

## The four stages

Each stage is a command with the same config machinery, and starts from the previous stage's weights:

```bash
smollm pretrain --config tiny --run-dir runs/tiny
smollm sft --config sft-tiny --init-from runs/tiny --run-dir runs/sft-tiny
smollm dpo --config dpo-tiny --init-from runs/sft-tiny --run-dir runs/dpo-tiny
smollm rlvr --config rlvr-tiny --init-from runs/dpo-tiny --run-dir runs/rlvr-tiny
```

or all four at once, one run directory per stage (`runs/pipe/pretrain`, `runs/pipe/sft`, …); running it again skips
finished stages and resumes an interrupted one:

```bash
smollm pipeline --config tiny --run-dir runs/pipe
smollm report runs/pipe
```

`smollm chat --model runs/pipe/rlvr` talks to the result, `smollm export --checkpoint runs/pipe/rlvr --out hf-model`
writes a Hugging Face SmolLM3 directory, and `smollm eval --model … --tasks smol` runs the small-model suite on
lm-evaluation-harness (`pip install ".[eval]"`). A run stopped by SIGINT/SIGTERM saves a checkpoint and exits
with 130/143; bad input ends with one line and exit code 2.

## Presets

| preset | model | batch (micro × accum × seq) | budget | for |
|---|---|---|---|---|
| `tiny` | 4 layers, d 128, 2K vocab | 8 × 2 × 128 | 150 steps | CPU, offline, tests |
| `sft-tiny`, `dpo-tiny`, `rlvr-tiny` | the same | 8 × 2 × 128, 8 × 1 × 256, 16 × 2 × 128 | 2 epochs, 60 steps, 100 steps | CPU, offline demo chats, pairs and arithmetic |
| `pretrain-135m` | SmolLM-135M shape | 8 × 32 × 2048 | 200M tokens (≈ one free Colab session, estimated) | a free Colab T4 |
| `sft-135m`, `dpo-135m`, `rlvr-135m` | the same | | smol-smoltalk 1 epoch, UltraFeedback 2 epochs, GSM8K 200 steps | a free Colab T4 |
| `pretrain` | `smollm-600m` (d 1536, 24 layers, GQA 12/4, NoPE every 4th layer) | 48 × 16 × 2048 ≈ 1.57M tokens | 10B tokens | one 80 GB GPU |
| `sft`, `dpo`, `rlvr` | the same | 16 × 4 × 2048, 8 × 4 × 2048, 16 × 8 × 1024 | smol-smoltalk 2 epochs, APO-zero 1 epoch, GSM8K 500 steps | one 80 GB GPU |

Pipeline presets chain them: `tiny`, `135m`, `600m`. Any field can be overridden:
`smollm pretrain --config tiny --set train.max_steps=20 --set optim.muon_lr=3e-3` (in a pipeline, `--set
sft:train.max_steps=20` touches one stage). `smollm config show sft-tiny` prints a resolved config with every field
documented. A run directory holds `config.yaml`, `metrics.jsonl` and `checkpoints/`; running the same command again
resumes.

## Past one GPU

Every stage runs under `torchrun` with the same commands; here two CPU processes:

```bash
OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m smollm_kit.cli pretrain --config tiny --run-dir runs/tiny-ddp
OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m smollm_kit.cli pretrain --config tiny --run-dir runs/tiny-fsdp --set train.parallel=fsdp
```

`train.parallel: auto` is DDP. `fsdp` shards parameters, gradients and optimizer state with FSDP2, and every rank
writes its own shard of each checkpoint with `torch.distributed.checkpoint`; `smollm export`, `smollm chat` and
`--init-from` read such a checkpoint in one process. Muon orthogonalises each matrix once, on one rank. A run resumes
with the number of processes it started with. `06a_distributed` covers several nodes and what the 600M recipe costs
on 8 and 64 GPUs.

Modules:

- `smollm_kit.checkpoint`: Atomic, verified, rotated, mirrored checkpoints that survive a Colab runtime vanishing mid-write.
- `smollm_kit.cli`: `smollm <command> --config <preset|yaml> [--set key=value ...]` — the same code as the notebook, from a shell.
- `smollm_kit.colab`: Where a run lives on Colab (local disk, mirrored to Drive), free-space checks, the pinned install, and the finish line: download.
- `smollm_kit.config`: Every knob of a training run in one typed, validated, YAML-serialisable object.
- `smollm_kit.corpus`: The offline demo corpus built from Python's own standard library, and the cache it and trained tokenizers live in.
- `smollm_kit.data`: Sources, seeded shuffling, domain mixture and packing: an exact, resumable stream of pretraining batches.
- `smollm_kit.distributed`: Past one GPU with `torchrun`: DDP or FSDP2, every rank's data position and RNG in the checkpoint, one decision for all ranks, and Muon that orthogonalises each matrix once.
- `smollm_kit.dpo`: Preference tuning: DPO, IPO and APO losses on packed chosen/rejected pairs, with reference log-probs cached in one pass.
- `smollm_kit.eval`: Downstream evaluation on lm-evaluation-harness: an `lm_eval` adapter over the kit's model (log-likelihoods, rolling perplexity, generation with the KV cache), the small-model suite with reference numbers, and `smollm eval`.
- `smollm_kit.export`: Write a checkpoint as a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as SmolLM3, and load SmolLM3 / Llama directories (or our own checkpoints) back into the kit.
- `smollm_kit.generate`: Sampling from a trained model: a KV cache, batched prompts, greedy / temperature / top-k / top-p, stop conditions, streaming, chat messages, a REPL and the `smollm generate` / `smollm chat` commands.
- `smollm_kit.interrupt`: Stop between two steps on Ctrl-C or `kill`, exit with the code a scheduler understands, and never leave orphan processes behind.
- `smollm_kit.liveplot`: One figure per stage, updated in place while it trains: smoothed loss, DPO reward accuracy, RL reward ± std; steps and tokens; the history of a resumed run.
- `smollm_kit.model`: A SmolLM3-style decoder: RMSNorm, SwiGLU, GQA, hybrid RoPE/NoPE, tied embeddings, document-causal attention behind three interchangeable kernels, a loss that never holds the full fp32 logits, and a KV cache.
- `smollm_kit.monitor`: FLOPs and MFU, what the hardware costs, loss-spike and NaN detection, and the metrics sinks (metrics.jsonl, W&B).
- `smollm_kit.optim`: Muon for the matrices inside the blocks, AdamW for everything else, one Warmup-Stable-Decay schedule on top.
- `smollm_kit.panel`: Widgets that drive a whole pipeline run: stages, per-stage budget, learning rates and batch, with what it will cost, and what cannot apply said in the panel.
- `smollm_kit.pipeline`: Pretrain → SFT → DPO/APO → RLVR in one call: each stage in its own run directory, each starting from the previous stage's final weights; finished stages are skipped, an interrupted one resumes.
- `smollm_kit.pretrain`: The first stage: next-token prediction on a packed, mixed corpus.
- `smollm_kit.report`: The report card of a run or a pipeline: per stage its config, steps, tokens, time, cost, final metrics, curves, downstream evals beside the published SmolLM2 numbers, and sample generations — `report.md` in the run directory.
- `smollm_kit.resume`: What a run directory may be resumed from, and what may change in between: safe config edits, model shape, broken checkpoints.
- `smollm_kit.rlvr`: Reinforcement learning with verifiable rewards: sample a group of completions per prompt, score them with a verifier, and push the policy towards the better ones (GRPO, Dr. GRPO, DAPO).
- `smollm_kit.rundir`: One writer per run directory: a lock file naming its holder, stale locks detected and explained, and the path checked before any heavy work.
- `smollm_kit.sft`: Supervised fine-tuning on chat data: a ChatML template with generation markers, assistant-only loss, conversations packed best-fit decreasing, an offline demo chat set and held-out answer checks.
- `smollm_kit.tokenizer`: Byte-level BPE training, the cached demo tokenizer, loading any `AutoTokenizer`, and encoding documents with BOS/EOS.
- `smollm_kit.trainer`: One loop for every stage: forward, backward, step, log, evaluate, save — and resume exactly.
- `smollm_kit.ui`: Everything `SmolLM_Colab.ipynb` uses, in one import: the Colab plumbing, the control panel and the live plots.
- `smollm_kit.verifiers`: Rewards you can check: a math answer checker, exact match, a format regex, Python unit tests in a sandboxed subprocess, a length penalty, a reward model — and a safe way to combine them."""

__version__ = "0.1.0"

import importlib as _importlib, sys as _sys, types as _types

# public name -> the submodule that defines it
_LAZY = {'load_config': 'config', 'Config': 'config', 'ConfigError': 'config',
         'pretrain': 'pretrain', 'sft': 'sft', 'dpo': 'dpo', 'rlvr': 'rlvr', 'pipeline': 'pipeline',
         'load_model': 'export', 'export_hf': 'export', 'init_model': 'export', 'generate': 'generate'}

def __getattr__(name:str):
    "Import the submodule defining public `name` on first access."
    if name not in _LAZY: raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    modname = f'{__name__}.{_LAZY[name]}'
    try: mod = _importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name != modname: raise  # a dependency is missing: say which
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} ({modname} does not exist)") from None
    obj = getattr(mod, name)
    globals()[name] = obj
    return obj

def __dir__(): return sorted(set(globals()) | set(_LAZY))

class _Package(_types.ModuleType):
    "Importing submodule `generate` (or `pretrain`, `sft`, ...) binds the package attribute to the function of that name, not the submodule."
    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, _types.ModuleType) and value.__name__ == f'{__name__}.{_LAZY[name]}':
            value = getattr(value, name, value)
        super().__setattr__(name, value)

_sys.modules[__name__].__class__ = _Package
