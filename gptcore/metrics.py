"""The metric files the train stage publishes (DVC metrics and plots).

``train.json`` is the run's summary; ``train_log.csv`` and ``val_log.csv`` are the
per-step curves that ``dvc plots`` draws.
"""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write_json, atomic_write_text


def write_train_outputs(result, metrics_dir: str | Path) -> None:
    """``train.json`` from ``result.metrics()``, the CSV logs from its train/val logs."""
    metrics_dir = Path(metrics_dir)
    atomic_write_json(metrics_dir / "train.json", result.metrics())
    for name, header, rows in (("train_log.csv", ["step", "train_loss", "lr", "tokens_per_s"], result.train_log),
                               ("val_log.csv", ["step", "val_loss"], result.val_log)):
        lines = [",".join(header)] + [",".join(_fmt(v) for v in row) for row in rows]
        atomic_write_text(metrics_dir / name, "\n".join(lines) + "\n")


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.6g}"
