"""Train a ~600M SmolLM-style language model end to end (pretrain, SFT, DPO, RLVR) on one GPU, notebook first.

Modules:

- `smollm_kit.export`: Write a checkpoint as a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as SmolLM3, and load SmolLM3 / Llama directories (or our own checkpoints) back into the kit.
- `smollm_kit.generate`: Sampling from a trained model: a KV cache, batched prompts, greedy / temperature / top-k / top-p, stop conditions, streaming, a REPL and the `smollm generate` command.
- `smollm_kit.model`: A SmolLM3-style decoder: RMSNorm, SwiGLU, GQA, hybrid RoPE/NoPE, tied embeddings, document-causal attention behind three interchangeable kernels, a loss that never holds the full fp32 logits, and a KV cache."""

__version__ = "0.1.0"

from .config import load_config, Config, ConfigError
from .pretrain import pretrain
from .export import load_model, export_hf
from .generate import generate
