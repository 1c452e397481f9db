"""Train a ~600M SmolLM-style language model end to end (pretrain, SFT, DPO, RLVR) on one GPU, notebook first.

Modules:

- `smollm_kit.eval`: Downstream evaluation on lm-evaluation-harness: an `lm_eval` adapter over the kit's model (log-likelihoods, rolling perplexity, generation with the KV cache), the small-model suite with reference numbers, and `smollm eval`.
- `smollm_kit.export`: Write a checkpoint as a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as SmolLM3, and load SmolLM3 / Llama directories (or our own checkpoints) back into the kit.
- `smollm_kit.generate`: Sampling from a trained model: a KV cache, batched prompts, greedy / temperature / top-k / top-p, stop conditions, streaming, chat messages, a REPL and the `smollm generate` / `smollm chat` commands.
- `smollm_kit.model`: A SmolLM3-style decoder: RMSNorm, SwiGLU, GQA, hybrid RoPE/NoPE, tied embeddings, document-causal attention behind three interchangeable kernels, a loss that never holds the full fp32 logits, and a KV cache."""

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
