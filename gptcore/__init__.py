"""gptcore: a GPT written from scratch in PyTorch, with tokenizers, checkpoints,
training, evaluation and generation for a reproducible DVC + MLflow pipeline."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, GPTConfig, Params, load_params
from .model import GPT, KVCache, export_hf, from_hf_state_dict
from .tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer, TokenizerError, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "Params", "load_params", "ConfigError",
    "save_checkpoint", "load_checkpoint", "CheckpointError", "export_hf", "from_hf_state_dict",
    "Tokenizer", "GPT2Tokenizer", "CharTokenizer", "TokenizerError", "load_tokenizer",
]
