"""The from-scratch GPT and its Hugging Face (GPT-2, GPT-NeoX) import and export.

``gpt.py`` is the model, ``loss.py`` its fused LM-head loss, ``decode.py`` the
KV-cached decoding steps generation uses, ``hf.py`` the weight and config mapping to
transformers' classes, ``hf_export.py`` and ``hf_load.py`` the directories. The mapping
is loaded on first use, so training (which never needs it) does not import it.
"""

from ..config import GPTConfig
from .gpt import GPT, KVCache

_HF = {"export_hf": "hf_export", "load_hf": "hf_load", "from_hf_state_dict": "hf", "to_hf_state_dict": "hf"}

__all__ = ["GPT", "GPTConfig", "KVCache", *_HF]


def __getattr__(name: str):
    if name in _HF:
        from . import hf, hf_export, hf_load

        return getattr({"hf": hf, "hf_export": hf_export, "hf_load": hf_load}[_HF[name]], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
