"""What ``train.init_from`` names, without loading its weights: the kind of source, whether
DVC tracks it, and the vocabulary its token ids mean (the tokenize stage's part of a fine-tune).

    scratch                     random weights from train.seed (the default)
    <dir>                       a gptcore checkpoint directory (e.g. a copy of models/best)
    models:/gptcore@champion    a registered version, by alias or number (models:/gptcore/3)
    hf:<dir>                    a Hugging Face GPT-2 or GPT-NeoX directory

Loading and checking the weights is :mod:`gptcore.training.init_from`'s; this module stays
light (no torch, no MLflow unless a registry URI is read) because the tokenize stage imports it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .data.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from .errors import ConfigError, GptcoreError, TokenizerError
from .io import current_dir
from .stage import covered

SCRATCH = "scratch"
HF_PREFIX = "hf:"
REGISTRY_PREFIX = "models:/"
ALLOWED = "scratch, a checkpoint directory, models:/gptcore@ALIAS, models:/gptcore/VERSION or hf:<directory>"


def is_local(spec: str) -> bool:
    """Whether ``spec`` names a directory on this machine (which DVC must track as a dep)."""
    return spec != SCRATCH and not spec.startswith(REGISTRY_PREFIX)


def local_path(spec: str) -> str:
    return spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec


def check_tracked(spec: str, deps: list[str] | None, root: Path, stage: str = "train") -> None:
    """A local init directory must exist and be a dep of ``stage`` (the path, or a directory
    above it): DVC re-runs a stage only when a dep changes, so an undeclared init model could
    be edited, or replaced, without the stage re-running."""
    if not is_local(spec):
        return
    target = (root / local_path(spec)).resolve()
    if not target.is_dir():
        raise ConfigError(f"train.init_from={spec!r}: no such directory {str(target)!r}; allowed: {ALLOWED}")
    if deps is not None and not covered(target, deps, root):
        raise ConfigError(f"train.init_from={spec!r}: {local_path(spec)!r} is not a dep of the {stage} stage in "
                          f"dvc.yaml, so DVC would not re-run the {stage} stage when it changes; add it under "
                          f"stages.{stage}.deps (docs/finetune.md)")


def init_bpe(spec: str) -> BPETokenizer | None:
    """The init model's trained BPE when it is a gptcore checkpoint (a directory or the
    registry's) with one, else None. A fine-tune encodes its text with the BPE the model
    learned its ids in, never with a new one trained on the new text."""
    if spec == SCRATCH or spec.startswith(HF_PREFIX):
        return None  # a Hugging Face directory holds GPT-2's BPE or characters (training/init_from.py checks)
    tokenizer = _gptcore_tokenizer(spec)
    return tokenizer if isinstance(tokenizer, BPETokenizer) else None


def init_chars(spec: str) -> list[str] | None:
    """The init model's characters in id order when it is a char-level model, else None
    (scratch, or a GPT-2-vocabulary model: GPT-2's BPE is one fixed vocabulary).

    A char model's ids are its own characters, so a fine-tune's text must be encoded with
    them, not with the characters the new text happens to contain: id 7 must mean what it
    meant in pretraining."""
    if spec == SCRATCH:
        return None
    if spec.startswith(HF_PREFIX):
        directory = Path(local_path(spec))
        if not directory.is_dir():
            raise ConfigError(f"train.init_from={spec!r}: no such directory; allowed: {ALLOWED}")
        path = directory / "tokenizer.json"
        if (directory / "vocab.json").is_file() or not path.is_file():
            return None  # GPT-2's BPE (stated, or assumed for a bare save_pretrained)
        return char_vocab(path)
    tokenizer = _gptcore_tokenizer(spec)
    return tokenizer.chars if isinstance(tokenizer, CharTokenizer) else None


def _gptcore_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of a gptcore model: a registry URI's or a checkpoint directory's."""
    where = f"train.init_from={spec!r}"
    if spec.startswith(REGISTRY_PREFIX):
        from .registry import fetch_checkpoint  # MLflow only where a registry URI is read

        with tempfile.TemporaryDirectory(prefix="gptcore-init-") as tmp:
            return _checkpoint_tokenizer(fetch_checkpoint(spec, tmp, what="train.init_from"), where)
    directory = Path(spec)
    if not directory.is_dir():
        raise ConfigError(f"{where}: no such directory; allowed: {ALLOWED}")
    return _checkpoint_tokenizer(current_dir(directory), where)


def _checkpoint_tokenizer(directory: Path, where: str) -> Tokenizer:
    try:
        return load_tokenizer(directory)
    except TokenizerError as exc:
        raise TokenizerError(f"{where}: {exc}") from None


def read_json(path: Path):
    """A Hugging Face directory's JSON file, or one GptcoreError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GptcoreError(f"{path}: not readable JSON ({exc})") from None


def char_vocab(path: Path) -> list[str] | None:
    """The characters, in id order, of a char-level Hugging Face tokenizer.json as
    ``gptcore export`` writes it (a WordLevel vocabulary of single characters); None when
    the file describes some other tokenizer."""
    spec = read_json(path)
    vocab = ((spec.get("model") or {}).get("vocab")) if isinstance(spec, dict) else None
    if not isinstance(vocab, dict) or not vocab:
        return None
    chars = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if len(t) == 1]
    return chars if [vocab[c] for c in chars] == list(range(len(chars))) else None
