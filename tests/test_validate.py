"""`make validate`'s engine on a tiny project: a baseline, a run that reproduces it exactly
(an empty metrics diff, exit 0), and a param that makes the model clearly worse (exit 1, the
diffs in validation.md). Real git, real `dvc exp run`, `dvc params diff`, `dvc metrics diff`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from project_copy import TINY_CHAR, git_project

pytestmark = pytest.mark.slow

SETTING = ["-S", "train.max_steps=6"]


def validate(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptcore.validate", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)


def test_validate_passes_on_the_baseline_and_fails_a_clearly_worse_model(tmp_path, mirror_dir):
    root = tmp_path / "project"
    env = git_project(root, mirror_dir, TINY_CHAR)

    missing = validate(root, env, *SETTING)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines() == [
        "error: base 'main' has no validation/eval.json to compare with; run `make validate` on that branch "
        "(--init writes the first one) and commit validation/ (docs/pipeline.md)"]

    init = validate(root, env, "--init", *SETTING)
    assert init.returncode == 0, init.stderr
    assert {"eval.json", "train.json", "train_log.csv", "val_log.csv", "loss.png"} <= \
        {p.name for p in (root / "validation").iterdir()}
    assert "tokens_per_s" not in json.loads((root / "validation/train.json").read_text())  # timings vary
    setting = json.loads((root / "validation/setting.json").read_text())
    assert setting["set"] == ["train.max_steps=6"] and "cpu family" in setting["machine"]
    committed = {p.name: p.read_bytes() for p in (root / "validation").glob("*.json")}
    subprocess.run(["git", "add", "validation"], cwd=root, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "validation baseline"], cwd=root, env=env, check=True)

    other = validate(root, env, "-S", "train.max_steps=5")  # refused before anything runs
    assert other.returncode == 2 and "baseline was made at train.max_steps=6, not train.max_steps=5" in other.stderr

    same = validate(root, env, *SETTING)
    assert same.returncode == 0, same.stderr
    assert "(+0.0000; tolerance 0.05): pass" in same.stdout
    assert {p.name: p.read_bytes() for p in (root / "validation").glob("*.json")} == committed
    report = (root / "validation.md").read_text()
    assert "No params changed." in report and "No metric changed" in report, report
    assert "![loss](validation/loss.png)" in report and "The baseline's: " in report

    params = root / "params.yaml"
    params.write_text(params.read_text().replace("learning_rate: 0.0015", "learning_rate: 1.0e-07")
                      .replace("min_lr: 0.00015", "min_lr: 1.0e-08"))
    worse = validate(root, env, *SETTING)
    assert worse.returncode == 1, worse.stdout + worse.stderr
    assert "FAIL, worse than the tolerance allows" in worse.stdout
    report = (root / "validation.md").read_text()
    assert "train.learning_rate" in report and "0.0015" in report, report
    assert "validation/eval.json" in report and "bits_per_byte" in report, report
