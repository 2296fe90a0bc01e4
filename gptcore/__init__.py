"""gptcore: a GPT written from scratch in PyTorch, with tokenizers, checkpoints,
training, evaluation and generation for a reproducible DVC + MLflow pipeline.

The public names below load on first use (PEP 562), so ``import gptcore.config`` and
``gptcore --help`` never pay for importing torch, and a DVC stage imports only the
modules it runs.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "model", "KVCache": "model", "export_hf": "model.hf_export", "load_hf": "model.hf_load",
    "from_hf_state_dict": "model.hf",
    "GPTConfig": "config", "Params": "config", "load_params": "config",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "Tokenizer": "data.tokenizer", "GPT2Tokenizer": "data.tokenizer", "CharTokenizer": "data.tokenizer",
    "load_tokenizer": "data.tokenizer",
    "GptcoreError": "errors", "ConfigError": "errors", "CheckpointError": "errors",
    "TokenizerError": "errors", "DataError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
