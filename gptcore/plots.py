"""Training curves as a PNG, from the metric files alone: no server, no browser.

    python -m gptcore.plots [--run LABEL=DIR ...] [-o docs/loss_curve.png]

Each ``--run`` names a directory holding a run's ``train_log.csv`` and ``val_log.csv``
(``metrics/`` after ``dvc repro``, or a copy of it); several runs are overlaid. The
left panel is the loss (training loss smoothed over 50 steps, and the periodic
validation estimates on ``train.eval_batches`` batches), the right one the learning
rate. ``make plots`` draws the committed default run beside the earlier recipes' runs in
``docs/muon_run`` and ``docs/reference_run`` (AdamW).
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from .errors import DataError
from .io import atomic_write_bytes


def read_curve(directory: str | Path) -> dict[str, list[list[float]]]:
    """``train``: [step, loss, lr] rows, ``val``: [step, loss] rows of one run."""
    directory = Path(directory)
    out = {}
    for name, file, cols in (("train", "train_log.csv", ("step", "train_loss", "lr")),
                             ("val", "val_log.csv", ("step", "val_loss"))):
        path = directory / file
        if not path.is_file():
            raise DataError(f"{path}: not found; a run's metrics directory holds train_log.csv and "
                            "val_log.csv (run `dvc repro train` first)")
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        missing = [c for c in cols if rows and c not in rows[0]]
        if not rows or missing:
            raise DataError(f"{path}: no rows or missing column(s) {missing}; expected {list(cols)}")
        out[name] = [[float(r[c]) for c in cols] for r in rows]
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: list[tuple[str, str | Path]], out: str | Path, smooth: int = 50) -> Path:
    """Draw the runs' loss and learning-rate curves into one PNG (written atomically)."""
    # matplotlib here, not at the top: only drawing needs it, and its import is slow.
    import matplotlib
    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    curves = [(label, read_curve(d)) for label, d in runs]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for i, (label, c) in enumerate(curves):
        color = f"C{i}"
        steps = [r[0] for r in c["train"]]
        ax_loss.plot(steps, _smooth([r[1] for r in c["train"]], smooth), color=color, alpha=0.6, lw=1,
                     label=f"{label}: train (mean of {smooth} steps)")
        ax_loss.plot([r[0] for r in c["val"]], [r[1] for r in c["val"]], color=color, marker="o", ms=3,
                     lw=1.8, label=f"{label}: val estimate (best {min(r[1] for r in c['val']):.3f})")
        ax_lr.plot(steps, [r[2] for r in c["train"]], color=color, label=label)
    low = min(min(r[1] for r in c["val"]) for _, c in curves)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss", ylim=(min(low, 3.0) - 0.2, 7.5))
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_lr.set(xlabel="step", ylabel="scheduled rate (Muon: x muon_lr_scale)", title="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.grid(alpha=0.3)
    ax_lr.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", metavar="LABEL=DIR",
                    help="a run to draw (repeatable); default: default=metrics")
    ap.add_argument("-o", "--out", default="docs/loss_curve.png")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.run or ["default=metrics"]:
        label, sep, directory = spec.partition("=")
        if not sep or not label or not directory:
            ap.error(f"--run {spec!r}: expected LABEL=DIR, e.g. default=metrics")
        runs.append((label, directory))
    try:
        print(plot_runs(runs, args.out))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
