"""Nothing a user made is ever lost: the real `dvc repro` after a good run, then a bad
param, bad data, a missing device and a crash in turn. Each fails with one clear line,
and `models/`, `metrics/` and `data/` keep every byte of the last good run (dvc.yaml's
outputs persist; each stage replaces them atomically itself, only once it has succeeded).
Then the fixed params run normally, resuming where the crash left off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from project_copy import TINY_CHAR as TINY
from project_copy import git_project, snapshot, wait_for_first_checkpoint, write_params

pytestmark = pytest.mark.slow  # real dvc repro with injected failures: `make test-all` and CI

VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")


def _run(args, root, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory, mirror_dir):
    """A tiny project under git with one good `dvc repro` behind it."""
    root = tmp_path_factory.mktemp("noloss") / "gptcore"
    env = git_project(root, mirror_dir, TINY)
    _ok(_run([DVC, "repro"], root, env))
    _ok(_run(["git", "add", "-A"], root, env))
    _ok(_run(["git", "commit", "-qm", "good run"], root, env))
    return root, env


def _edit_params(root: Path, over: dict) -> None:
    write_params(root, TINY, over)


def _failed_line(proc: subprocess.CompletedProcess, stage: str) -> str:
    """DVC stopped at ``stage``, whose one line of stderr (exit 2) is returned."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"failed to reproduce '{stage}'" in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _no_cuda_device() -> str:
    return "mps" if torch.cuda.is_available() else "cuda"


def test_failing_stages_keep_every_output(project, tmp_path):
    root, env = project
    before = snapshot(root)
    assert {"models/best/model.safetensors", "metrics/train.json", "metrics/train_log.csv", "metrics/val_log.csv",
            "metrics/mlflow_run.json", "metrics/eval.json", "metrics/samples.md", "data/raw/input.txt",
            "data/processed/train.bin"} <= set(before)
    runs_before = sorted(p.name for p in (root / ".gptcore" / "runs").glob("*")) \
        if (root / ".gptcore" / "runs").exists() else []

    def restore():
        _ok(_run(["git", "checkout", "--", "params.yaml", "dvc.yaml"], root, env))

    # A typo added the way DVC itself suggests (`+key=value` for a new key).
    proc = _run([DVC, "exp", "run", "--set-param", "+train.learning_rat=1"], root, env)
    line = _failed_line(proc, "train")
    assert line.startswith("error: params.yaml: train: unknown key(s) 'learning_rat' (did you mean "
                           "'learning_rate'?)"), line
    assert snapshot(root) == before
    restore()

    # A context longer than the data (the val split is 111,540 characters).
    _edit_params(root, {"model": {"block_size": 200_000}})
    line = _failed_line(_run([DVC, "repro"], root, env), "train")
    assert "fewer than block_size + 1 = 200001; lower model.block_size or use more data" in line, line
    assert snapshot(root) == before
    restore()

    # A device this machine does not have: train fails before DVC would have cleared models/.
    device = _no_cuda_device()
    _edit_params(root, {"train": {"device": device}})
    line = _failed_line(_run([DVC, "repro"], root, env), "train")
    assert line.startswith(f"error: train.device={device} but "), line
    assert snapshot(root) == before
    restore()

    # Bad data: the corpus is a symlink loop. Every stage refuses it; download is first
    # and keeps data/raw (it used to be deleted).
    (root / "loop.txt").symlink_to("loop.txt")
    _edit_params(root, {"data": {"sources": [{"path": "loop.txt"}], "require_sha256": "none"}})
    line = _failed_line(_run([DVC, "repro"], root, env), "download")
    assert line.startswith("error: params.yaml: data.sources[0].path='loop.txt' is a symlink loop or unreadable "
                           "(Symlink loop from "), line
    assert snapshot(root) == before
    (root / "loop.txt").unlink()
    restore()

    # Nothing above started training or left a stray file.
    assert sorted(p.name for p in (root / ".gptcore" / "runs").glob("*")) == runs_before
    assert json.loads(_run([DVC, "status", "--json"], root, env).stdout or "{}") == {}


def test_a_crash_mid_training_keeps_outputs_and_the_rerun_resumes(project):
    """SIGKILL the whole `dvc repro` (DVC and the train stage: a crash, not a clean stop)
    once training has saved its first resume state: the last good outputs are intact and
    DVC still says train must run; the next `dvc repro` resumes and completes.

    The params are a hand edit that writes the learning rate as people do, ``1e-3``: DVC
    (YAML 1.2) reads 0.001, and so do the stages now (it was the string '1e-3', "not a
    number", after DVC had cleared the outputs)."""
    root, env = project
    before = snapshot(root)
    _edit_params(root, {"train": {"max_steps": 100, "eval_interval": 50, "checkpoint_interval": 3}})
    text = (root / "params.yaml").read_text()
    assert "  learning_rate: 0.0015\n" in text
    (root / "params.yaml").write_text(text.replace("  learning_rate: 0.0015\n", "  learning_rate: 1e-3\n"))
    proc = subprocess.Popen([DVC, "repro"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_first_checkpoint(proc, root, 180)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(root) == before
    # Only train's params changed; evaluate and sample run once train has new outputs.
    assert set(json.loads(_run([DVC, "status", "--json"], root, env).stdout)) == {"train"}

    done = _ok(_run([DVC, "repro"], root, env))
    assert "resuming from step" in done.stderr, done.stderr
    assert json.loads((root / "metrics/train.json").read_text())["steps"] == 100
    assert snapshot(root)["models/best/model.safetensors"] != before["models/best/model.safetensors"]
    assert json.loads(_run([DVC, "status", "--json"], root, env).stdout or "{}") == {}
    _logged_learning_rate_is(root, env, 0.001)
    _ok(_run(["git", "checkout", "--", "params.yaml"], root, env))


def test_exponent_learning_rate_through_dvc_exp_run_set_param(project):
    root, env = project
    _ok(_run(["git", "checkout", "--", "params.yaml"], root, env))
    _ok(_run([DVC, "exp", "run", "--set-param", "train.learning_rate=3E-4"], root, env))
    _logged_learning_rate_is(root, env, 0.0003)
    _ok(_run(["git", "checkout", "--", "params.yaml"], root, env))


def _logged_learning_rate_is(root: Path, env: dict, expected: float) -> None:
    """DVC's params diff and the MLflow run of the finished pipeline agree on the value."""
    from mlflow.tracking import MlflowClient

    diff = json.loads(_ok(_run([DVC, "params", "diff", "--json"], root, env)).stdout)
    assert diff["params.yaml"]["train.learning_rate"]["new"] == expected
    run_id = json.loads((root / "metrics/mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").get_run(run_id)
    assert float(run.data.params["train.learning_rate"]) == expected
    assert "eval_val_loss" in run.data.metrics
