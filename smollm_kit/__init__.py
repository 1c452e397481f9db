__version__ = "0.1.0"

from .config import load_config, Config, ConfigError

_lazy = {'pretrain': 'pretrain', 'load_model': 'export', 'export_hf': 'export', 'generate': 'generate'}

def __getattr__(name):
    "Import the heavier entry points only when they are first used, so `import smollm_kit` stays fast."
    if name in _lazy:
        import importlib
        return getattr(importlib.import_module(f'.{_lazy[name]}', __name__), name)
    raise AttributeError(f"module 'smollm_kit' has no attribute {name!r}")
