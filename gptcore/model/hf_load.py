"""Read a Hugging Face transformers directory (GPT-2 or GPT-NeoX, as ``save_pretrained``
or :func:`gptcore.model.hf_export.export_hf` writes it) into a gptcore GPT.

Weights come from safetensors (one file, or shards listed in ``model.safetensors.index.json``),
or else from ``pytorch_model.bin`` (or its shards) read with ``torch.load(weights_only=True)``,
which refuses any pickle that would build objects or call functions before any of it runs.
Nothing else is ever unpickled.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io import read_json_object
from .gpt import GPT
from .hf import HFError, config_from_hf, from_hf_state_dict

WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # transformers' names, in its order of preference


def load_hf(directory: str | Path) -> GPT:
    """The gptcore GPT (eval mode, fp32, on the CPU) of a Hugging Face model directory; a
    one-line HFError names what gptcore cannot read (a config field, a file, a tensor)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HFError(f"{directory}: no such directory; allowed: a Hugging Face model directory "
                      "(config.json + model.safetensors or pytorch_model.bin)")
    path = directory / "config.json"
    config = config_from_hf(read_json_object(path, HFError, missing="missing; not a Hugging Face model directory"),
                            where=str(path))
    try:
        return from_hf_state_dict(read_weights(directory), config).eval()
    except HFError as exc:
        if str(exc).startswith(str(directory)):
            raise
        raise HFError(f"{directory}: {exc}") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Tensor name -> tensor from the directory's weight file(s)."""
    for name in WEIGHTS:
        single, index = directory / name, directory / f"{name}.index.json"
        if single.is_file():
            return _read(single)
        if index.is_file():
            return _read_shards(index)
    raise HFError(f"{directory}: no weights; allowed: {', '.join(WEIGHTS)}, or shards listed in "
                  f"{' or '.join(n + '.index.json' for n in WEIGHTS)}")


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json_object(index, HFError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFError(f"{index}: no weight_map of tensor names to shard files")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        # A shard is a file beside the index: a path elsewhere (../, /etc/...) is not read.
        if Path(shard).name != shard or shard in (".", ".."):
            raise HFError(f"{index}: shard {shard!r} is not a file name; allowed: files in {index.parent}")
        if not (index.parent / shard).is_file():
            raise HFError(f"{index}: shard {shard!r} is missing")
        state.update(_read(index.parent / shard))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise HFError(f"{index}: tensors {absent[:5]} are in no shard")
    return state


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise HFError(f"{path}: not a valid safetensors file (truncated or corrupt?): "
                          f"{' '.join(str(exc).split())[:160]}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise HFError(f"{path}: refused to load: it holds more than tensors and plain containers, and "
                      f"unpickling it could run code ({_refused(exc)}); allowed: tensors only "
                      "(model.safetensors is safer still)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise HFError(f"{path}: corrupt or truncated: {' '.join(str(exc).split())[:160]}") from None
    if not isinstance(state, dict):
        raise HFError(f"{path}: holds a {type(state).__name__}; allowed: a mapping of names to tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise HFError(f"{path}: entry {key!r} holds a {type(value).__name__}; allowed: a mapping of "
                          "names to tensors")
    return state


def _refused(exc: Exception) -> str:
    """What torch refused, in a few words (not its advice to retry with weights_only=False)."""
    words = str(exc).split()
    if "GLOBAL" in words[:-1]:
        return f"it references {words[words.index('GLOBAL') + 1]}"
    return "not a weights-only pickle"
