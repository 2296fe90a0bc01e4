"""The checkpoint format: a directory that loads by itself, offline.

    <dir>/config.json        format name + version, the GPTConfig, free-form metadata
    <dir>/model.safetensors  weights (the tied LM head is stored once, as wte)
    <dir>/tokenizer.json     tokenizer spec (+ vocab.bpe / encoder.json for gpt2, bpe_ranks.txt for bpe)
    <dir>/trainer_state.pt   optional: optimizer, schedule, RNG and data position for resume

Nothing here unpickles arbitrary objects: tensors come from safetensors, and the
trainer state is read with ``torch.load(weights_only=True)``, which refuses any
pickle that would construct objects or call functions. Writes go through
:func:`gptcore.io.atomic_dir`, so a crash mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from .config import GPTConfig
from .data.tokenizer import Tokenizer, load_tokenizer
from .errors import CheckpointError, ConfigError, TokenizerError
from .io import atomic_dir, current_dir, read_json_object, tree_digest
from .model import GPT

FORMAT = "gptcore"
FORMAT_VERSION = 1
TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(directory: str | Path, model: GPT, tokenizer: Tokenizer,
                    meta: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Atomically write ``model`` (+ tokenizer, metadata, optional trainer state) to ``directory``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "model": model.config.to_dict(), "meta": meta or {}}
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        # save_id is the digest of everything saved, not a random id: the same weights and
        # config give a byte-identical directory (so DVC's hash of models/ only changes when
        # the model does), and a reader still tells a replaced save apart (see _identity).
        config = {**config, "save_id": _content_digest(tmp, config)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def _content_digest(directory: Path, config: dict) -> str:
    """sha256 over ``config`` and every file in ``directory`` (names and bytes, in name order)."""
    return tree_digest(directory, json.dumps(config, sort_keys=True).encode("utf-8"))


def read_config(directory: str | Path) -> tuple[GPTConfig, dict]:
    directory = current_dir(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoint directory here")
    raw = read_json_object(path, CheckpointError, missing="missing; not a gptcore checkpoint")
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r} "
                              "(a Hugging Face directory loads with gptcore.model.load_hf)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {raw.get('format_version')!r} unsupported; "
                              f"this gptcore reads version {FORMAT_VERSION}")
    try:
        config = GPTConfig.from_dict(raw.get("model", {}))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid model config: {exc}") from None
    return config, raw.get("meta", {})


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    attn_impl: str | None = None) -> tuple[GPT, Tokenizer, dict]:
    """Load ``(model, tokenizer, meta)`` from a checkpoint directory, model in eval mode.

    Safe while a trainer replaces the directory (a new best model): each save is a new
    directory renamed into place, so a load that saw the directory change under it (or
    lost a file to the swap) starts again, and never mixes two saves' files."""
    for attempt in range(_LOAD_ATTEMPTS):
        before = _identity(directory)
        try:
            loaded = _load_checkpoint(Path(directory), device, attn_impl)
        except CheckpointError:
            # Retry only if a save moved things meanwhile: a new save in place, or the
            # directory between a save's two renames (only <dir>.old there right now).
            # ``before`` may be None for the same reason (the directory renamed or removed
            # while it was being identified), so only an unchanged identity, None or not,
            # outside a save means the checkpoint itself is bad.
            mid_save = current_dir(directory) != Path(directory)
            if (_identity(directory) == before and not mid_save) or attempt == _LOAD_ATTEMPTS - 1:
                raise
        else:
            if before is not None and _identity(directory) == before:
                return loaded
        time.sleep(0.01 * (attempt + 1))  # a save is in progress: let it land
    raise CheckpointError(f"{directory}: replaced {_LOAD_ATTEMPTS} times while being read; try again")


_LOAD_ATTEMPTS = 10


def _identity(directory: str | Path):
    """Which save is there now: its save_id (its content's digest) and the directory's
    inode. Every save is a new directory renamed into place, so the same identity before
    and after a load means nothing was replaced meanwhile; two saves of identical content
    share a save_id, and a reader mixing their files would still read one model."""
    path = current_dir(directory)
    try:
        st = os.stat(path)
        save_id = json.loads((path / "config.json").read_text(encoding="utf-8")).get("save_id")
    except (OSError, ValueError, AttributeError):
        return None
    return save_id, st.st_dev, st.st_ino


def _load_checkpoint(directory: Path, device, attn_impl: str | None) -> tuple[GPT, Tokenizer, dict]:
    directory = current_dir(directory)
    config, meta = read_config(directory)
    if attn_impl is not None:
        config = GPTConfig.from_dict({**config.to_dict(), "attn_impl": attn_impl})
    weights = directory / "model.safetensors"
    try:
        data = weights.read_bytes()  # one read: the header checked below and the tensors are one save's
        _check_shapes(config, _header_shapes(data), directory)  # before config.json's sizes allocate anything
        state = load(data)
    except CheckpointError:
        raise  # a RuntimeError too: not to be reported as a corrupt file below
    except FileNotFoundError:
        raise CheckpointError(f"{weights}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # safetensors: RuntimeError if unopenable
        if not weights.exists():
            raise CheckpointError(f"{weights}: missing") from None
        raise CheckpointError(f"{weights}: not a valid safetensors file (truncated or corrupt?): {exc}") from None
    model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: tensors do not match config.json: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(f"{weights}: {name} has shape {tuple(state[name].shape)}, "
                                  f"config.json implies {tuple(shape)}")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)
    try:
        tokenizer = load_tokenizer(directory)
    except TokenizerError as exc:
        raise CheckpointError(f"{directory}: tokenizer: {exc}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} ids but the model "
                              f"only {config.vocab_size}")
    return model.to(device).eval(), tokenizer, meta


def _header_shapes(data: bytes) -> dict[str, tuple]:
    """Tensor name -> shape from a safetensors file's header (8-byte length, then JSON)."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes: shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(f"header of {size} bytes in a {len(data)}-byte file")
    header = json.loads(data[8:8 + size])
    try:
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (AttributeError, KeyError, TypeError):
        raise ValueError("header entries without a tensor shape") from None


# With rotary positions no weight holds block_size, so a corrupt config.json's value is
# bounded here instead (KV caches are allocated to it).
MAX_ROPE_BLOCK = 1 << 20


def _check_shapes(config: GPTConfig, shapes: dict[str, tuple], directory: Path) -> None:
    """config.json's sizes must be the weights' own, checked on the file's header before
    anything is allocated: a corrupt or hand-edited ``block_size: 10**12`` is one error,
    not an allocator failure. (Every tensor's name and shape is checked once the model
    is built.)"""
    wte, wpe = shapes.get("transformer.wte.weight"), shapes.get("transformer.wpe.weight")
    learned = config.position == "learned"  # rotary positions have no weights (nor a size to check)
    if wte is None or len(wte) != 2 or (learned and (wpe is None or len(wpe) != 2)):
        raise CheckpointError(f"{directory / 'model.safetensors'}: no token/position embedding tensors; "
                              "not a gptcore checkpoint's weights")
    layers = len({name.split(".")[2] for name in shapes if name.startswith("transformer.h.")})
    held = {"vocab_size": wte[0], "n_embd": wte[1], "n_layer": layers, **({"block_size": wpe[0]} if learned else {})}
    wrong = [f"{k}={getattr(config, k)} (the weights hold {v})" for k, v in held.items() if getattr(config, k) != v]
    if not learned and config.block_size > MAX_ROPE_BLOCK:  # decoding allocates block_size cache slots
        wrong.append(f"block_size={config.block_size} (position: rope; at most {MAX_ROPE_BLOCK:,})")
    if wrong:
        raise CheckpointError(f"{directory / 'config.json'}: {', '.join(wrong)}; config.json and "
                              "model.safetensors disagree (a corrupt or hand-edited checkpoint): restore it "
                              "(dvc checkout, README 'Troubleshooting') or retrain")


def load_trainer_state(directory: str | Path) -> dict[str, Any] | None:
    """The saved optimizer/schedule/RNG/data state, or None if the checkpoint has none.

    Uses ``weights_only=True``: a pickle that tries to build arbitrary objects or run
    code is refused before anything in it executes.
    """
    path = current_dir(directory) / TRAINER_STATE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors and plain "
                              "containers, and unpickling it could run code "
                              f"({_unpickling_reason(exc)})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated: {exc}") from None


def _unpickling_reason(exc: Exception) -> str:
    """torch's reason in a few words, without its advice to retry with weights_only=False."""
    text = " ".join(str(exc).split())
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it references {found.group(1)}"
    found = re.search(r"WeightsUnpickler error: ([^.]*)", text)
    return found.group(1).strip() if found else "not a weights-only pickle"
