"""The train stage under a real `torchrun` with two CPU processes (gloo): ranks train on
different batches, gradients are averaged, rank 0 alone evaluates and publishes, and an
interrupted two-process run resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from gptcore.checkpoint import load_checkpoint
from project_copy import signal_after_first_checkpoint
from test_faults import ok, project, stage, write_params  # noqa: F401  (fixture reuse)

TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
            "-m", "stages.train"]


def _torchrun(root, env, timeout=300):
    return subprocess.run(TORCHRUN, cwd=root, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def test_torchrun_two_processes(project):
    root, env = project
    write_params(root, {"train": {"max_steps": 4, "eval_interval": 2, "checkpoint_interval": 2}})
    proc = _torchrun(root, env)
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


def test_torchrun_interrupted_run_resumes_bit_exactly(project):
    root, env = project
    # Dropout on, so each rank's RNG state matters; one evaluation at the end, so the
    # published best model is the final one.
    write_params(root, {"model": {"dropout": 0.1},
                        "train": {"max_steps": 300, "eval_interval": 300, "checkpoint_interval": 10}})
    ok(_torchrun(root, env))
    reference = load_file(str(root / "models/best/model.safetensors"))

    rc, out, err = signal_after_first_checkpoint(TORCHRUN, root, {**env, "OMP_NUM_THREADS": "1"},
                                                 signal.SIGTERM)
    assert rc != 0, out + err
    assert "state saved" in err, err
    (last,) = root.glob(".gptcore/runs/*/last")
    from gptcore.checkpoint import load_trainer_state
    state = load_trainer_state(last)
    assert 10 <= state["step"] < 300 and len(state["ranks"]) == 2

    again = _torchrun(root, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from step {state['step']}" in again.stderr
    resumed = load_file(str(root / "models/best/model.safetensors"))
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
