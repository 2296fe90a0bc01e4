"""The from-scratch GPT and its GPT-2 (Hugging Face layout) weight mapping."""

from ..config import GPTConfig
from .gpt import GPT, KVCache
from .hf import export_hf, from_hf_state_dict, to_hf_state_dict

__all__ = ["GPT", "GPTConfig", "KVCache", "export_hf", "from_hf_state_dict", "to_hf_state_dict"]
