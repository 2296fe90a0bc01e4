"""The train stage under a real `torchrun` with two CPU processes (gloo): ranks train on
different batches, gradients are averaged, rank 0 alone evaluates and publishes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from gptcore.checkpoint import load_checkpoint
from test_faults import ok, project, stage, write_params  # noqa: F401  (fixture reuse)


def test_torchrun_two_processes(project):
    root, env = project
    write_params(root, {"train": {"max_steps": 4, "eval_interval": 2, "checkpoint_interval": 2}})
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages.train"],
                          cwd=root, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((root / "metrics/train.json").read_text())
    # Both ranks' tokens are counted: 4 steps x 2 ranks x batch 4 x block 32.
    assert metrics["steps"] == 4 and metrics["tokens_seen"] == 4 * 2 * 4 * 32
    assert [row.split(",")[0] for row in (root / "metrics/val_log.csv").read_text().split()[1:]] == ["2", "4"]
    model, _, meta = load_checkpoint(root / "models/best")
    assert meta["step"] in (2, 4)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not list(root.glob(".gptcore/runs/*"))  # rank 0 cleaned up the finished run
    ok(stage("evaluate", root, env))
