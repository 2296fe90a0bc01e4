"""What a training run reports (:class:`TrainResult`), the metric files the train stage
publishes from it (DVC metrics and plots), and the divergence check on its losses.

``train.json`` is the run's summary; ``train_log.csv`` and ``val_log.csv`` are the
per-step curves that ``dvc plots`` draws.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text


@dataclass
class TrainResult:
    best_val_loss: float
    final_val_loss: float
    best_step: int
    steps: int
    tokens_seen: int
    tokens_per_s: float
    train_time_s: float  # time inside training steps (what tokens_per_s is measured over)
    wall_time_s: float  # the whole run on the clock, evaluations and checkpoints included
    stopped_early: bool
    resumed_from_step: int
    num_parameters: int
    # Where it ran and the matmul precision it actually used (train.dtype falls back where
    # the hardware lacks it; see training.device.resolve_precision), so runs compare honestly.
    device: str = "cpu"
    dtype: str = "float32"
    # tokens_per_s x the train split's bytes per token: the speed that compares across
    # tokenizers (a smaller vocabulary makes steps cheaper but spends more tokens per byte).
    bytes_per_s: float = 0.0
    train_log: list = field(default_factory=list)  # [step, train_loss, lr, tokens_per_s]
    val_log: list = field(default_factory=list)  # [step, val_loss]

    def metrics(self) -> dict:
        d = asdict(self)
        d.pop("train_log")
        d.pop("val_log")
        return d


def check_finite(step: int, loss: float, best_step: int, best_dir: Path, cfg) -> None:
    """A non-finite training loss ends the run with what was kept and what to change."""
    if math.isfinite(loss):
        return
    kept = (f"the best model so far (step {best_step}) is in {best_dir}" if best_step >= 0
            else "no model was published")
    # Advise only what is not already set: clipping that is on cannot be "enabled".
    advice = f"lower train.learning_rate (now {cfg.learning_rate:g})"
    if cfg.grad_clip <= 0:
        advice += " or enable train.grad_clip (e.g. 1.0)"
    raise FloatingPointError(f"training loss is {loss} at step {step}: the run diverged; {kept}; {advice}")


def write_train_outputs(result: TrainResult, metrics_dir: str | Path) -> None:
    """``train.json`` from ``result.metrics()``, the CSV logs from its train/val logs."""
    metrics_dir = Path(metrics_dir)
    atomic_write_json(metrics_dir / "train.json", result.metrics())
    for name, header, rows in (("train_log.csv", ["step", "train_loss", "lr", "tokens_per_s"], result.train_log),
                               ("val_log.csv", ["step", "val_loss"], result.val_log)):
        lines = [",".join(header)] + [",".join(_fmt(v) for v in row) for row in rows]
        atomic_write_text(metrics_dir / name, "\n".join(lines) + "\n")


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.6g}"
