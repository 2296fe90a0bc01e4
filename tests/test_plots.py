"""`python -m gptcore.plots`: training curves drawn from metric files into a PNG."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptcore.errors import DataError
from gptcore.plots import plot_runs, read_curve

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs/reference_run"


def test_two_runs_overlaid_into_one_png(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(REFERENCE, other)
    out = plot_runs([("reference", REFERENCE), ("other", other)], tmp_path / "plots/curve.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1210, 462)  # 11 x 4.2 inches at 110 dpi
    assert b"Software" not in data  # no version stamp: the same curves give the same bytes
    assert plot_runs([("reference", REFERENCE), ("other", other)], tmp_path / "again.png").read_bytes() == data
    assert not list((tmp_path / "plots").glob(".*"))  # atomic write: no temp file left


def test_read_curve_matches_the_csv():
    c = read_curve(REFERENCE)
    lines = (REFERENCE / "val_log.csv").read_text().splitlines()[1:]
    assert [r[0] for r in c["val"]] == [float(line.split(",")[0]) for line in lines]
    assert c["train"][0][0] == 1.0 and len(c["train"][0]) == 3  # step, loss, lr


def test_missing_or_malformed_metrics_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"train_log.csv: not found.*dvc repro train"):
        read_curve(tmp_path)
    (tmp_path / "train_log.csv").write_text("step,loss\n1,2\n")
    (tmp_path / "val_log.csv").write_text("step,val_loss\n1,2\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['train_loss', 'lr'\]"):
        read_curve(tmp_path)
    p = subprocess.run([sys.executable, "-m", "gptcore.plots", "--run", "nolabel"], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 2 and "expected LABEL=DIR" in p.stderr
    p = subprocess.run([sys.executable, "-m", "gptcore.plots", "--run", f"x={tmp_path / 'none'}",
                        "-o", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert not (tmp_path / "x.png").exists()
