"""The from-scratch GPT and its GPT-2 (Hugging Face layout) weight mapping.

``gpt.py`` is the model, ``loss.py`` its fused LM-head loss, ``decode.py`` the
KV-cached decoding steps generation uses, ``hf.py`` the import/export mapping. The
mapping is loaded on first use, so training (which never needs it) does not import it.
"""

from ..config import GPTConfig
from .gpt import GPT, KVCache

_HF = ("export_hf", "from_hf_state_dict", "to_hf_state_dict")

__all__ = ["GPT", "GPTConfig", "KVCache", *_HF]


def __getattr__(name: str):
    if name in _HF:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
