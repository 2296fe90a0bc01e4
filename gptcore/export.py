"""``gptcore export``: a checkpoint, wherever it lives, as a Hugging Face model directory.

The source is a checkpoint directory, an MLflow run id or a ``models:/`` URI (the model
sources ``gptcore generate`` takes); the writing is :func:`gptcore.model.hf_export.export_hf`.
An existing directory with anything in it is never replaced unless asked (``force``), and
never when it holds, or lies inside, the checkpoint being exported.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .checkpoint import load_checkpoint
from .model.hf import CLASSES, HFError, architecture
from .model.hf_export import export_hf
from .registry import fetch_checkpoint

FORMATS = ("hf",)


def export_source(source: str, out: str | Path, fmt: str = "hf", force: bool = False) -> str:
    """Export ``source`` to ``out`` in format ``fmt``; a line saying what was written."""
    if fmt not in FORMATS:
        raise HFError(f"--format={fmt!r} is invalid; allowed: {' | '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, source, force)
    with tempfile.TemporaryDirectory(prefix="gptcore-export-") as tmp:
        # Copied out of the MLflow store, then read by the same safe loader as any checkpoint
        # (and the tokenizer's files read from the copy before it goes).
        model, tokenizer, _ = load_checkpoint(fetch_checkpoint(source, tmp))
        export_hf(model, out, tokenizer)
    return f"exported {source} to {out} as {CLASSES[architecture(model.config)]} (tokenizer: {tokenizer.describe()})"


def _check_out(out: Path, source: str, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HFError(f"OUT {str(out)!r} is a file; allowed: a new or empty directory")
    src = Path(source)
    if src.exists():
        a, b = out.resolve(), src.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise HFError(f"OUT {str(out)!r} overlaps SOURCE {source!r} (writing it would change or delete the "
                          "checkpoint); allowed: a directory outside the checkpoint")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise HFError(f"OUT {str(out)!r} exists and is not empty; allowed: a new or empty directory, or "
                      "--force to replace it and everything in it")
