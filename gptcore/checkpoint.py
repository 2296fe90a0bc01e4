"""The checkpoint format: a directory that loads by itself, offline.

    <dir>/config.json        format name + version, the GPTConfig, free-form metadata
    <dir>/model.safetensors  weights (the tied LM head is stored once, as wte)
    <dir>/tokenizer.json     tokenizer spec (+ vocab.bpe / encoder.json for gpt2)
    <dir>/trainer_state.pt   optional: optimizer, schedule, RNG and data position for resume

Nothing here unpickles arbitrary objects: tensors come from safetensors, and the
trainer state is read with ``torch.load(weights_only=True)``, which refuses any
pickle that would construct objects or call functions. Writes go through
:func:`gptcore.io.atomic_dir`, so a crash mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .config import GPTConfig
from .errors import CheckpointError, ConfigError, TokenizerError
from .io import atomic_dir, recover_dir
from .model import GPT
from .tokenizer import Tokenizer, load_tokenizer

FORMAT = "gptcore"
FORMAT_VERSION = 1
TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(directory: str | Path, model: GPT, tokenizer: Tokenizer,
                    meta: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Atomically write ``model`` (+ tokenizer, metadata, optional trainer state) to ``directory``."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "model": model.config.to_dict(), "meta": meta or {}}
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
    return Path(directory)


def read_config(directory: str | Path) -> tuple[GPTConfig, dict]:
    directory = recover_dir(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoint directory here")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a gptcore checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r} "
                              "(a Hugging Face GPT-2 directory is imported with gptcore.model.hf)")
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
    """Load ``(model, tokenizer, meta)`` from a checkpoint directory, model in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config, meta = read_config(directory)
    if attn_impl is not None:
        config = GPTConfig.from_dict({**config.to_dict(), "attn_impl": attn_impl})
    weights = directory / "model.safetensors"
    try:
        state = load_file(str(weights), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{weights}: missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
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


def load_trainer_state(directory: str | Path) -> dict[str, Any] | None:
    """The saved optimizer/schedule/RNG/data state, or None if the checkpoint has none.

    Uses ``weights_only=True``: a pickle that tries to build arbitrary objects or run
    code is refused before anything in it executes.
    """
    path = recover_dir(directory) / TRAINER_STATE
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
