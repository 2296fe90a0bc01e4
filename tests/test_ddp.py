"""The train stage under a real `torchrun` with two CPU processes (gloo): ranks train on
different batches, gradients are averaged, rank 0 alone evaluates and publishes, and an
interrupted two-process run resumes to exactly the weights of an uninterrupted one: after
SIGTERM and a rerun, after a rank is SIGKILLed and torchrun restarts the group
(``--max-restarts``), and two launchers meeting as two nodes train exactly the same run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from project_copy import (
    TINY_CHAR,
    copy_project,
    ok,
    run_stage,
    signal_after_first_checkpoint,
    snapshot,
    trained_project,
    wait_for_first_checkpoint,
)
from safetensors.torch import load_file
from test_faults import closed_port as free_port  # binds 127.0.0.1:0: a port free right now
from test_faults import write_params

from gptcore.checkpoint import load_checkpoint, load_trainer_state

pytestmark = pytest.mark.slow  # torchrun with two processes: `make test-all` and CI

TORCHRUN_BIN = str(Path(sys.executable).parent / "torchrun")
TORCHRUN = [TORCHRUN_BIN, "--standalone", "--nproc-per-node", "2", "-m", "stages.train"]
# The resumable runs: dropout on, so each rank's RNG state matters; one evaluation at the
# end, so the published best model is the final weight average (which rank 0 keeps and
# the resume state carries); a resume checkpoint every 10 steps.
RESUMABLE = {"model": {"dropout": 0.1},
             "train": {"max_steps": 100, "eval_interval": 100, "checkpoint_interval": 10, "ema_decay": 0.9}}
# What must not differ between runs of the same params (train.json less its timings).
SAME = ("best_val_loss", "final_val_loss", "best_step", "steps", "tokens_seen", "stopped_early",
        "num_parameters")


def _torchrun(root, env, timeout=300):
    return subprocess.run(TORCHRUN, cwd=root, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def _launch(args, root, env) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=root, env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers(launcher: int) -> dict[int, int]:
    """{RANK: pid} of a torchrun launcher's worker processes (its children, by their env)."""
    found, children = {}, []
    for task in Path(f"/proc/{launcher}/task").glob("*"):
        try:
            children += map(int, (task / "children").read_text().split())
        except OSError:  # the thread ended meanwhile
            pass
    for pid in children:
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        env = dict(v.split("=", 1) for v in raw.split("\0") if "=" in v)
        if "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


def _stop(*launchers: subprocess.Popen) -> None:
    """After a failed assertion: kill what is left. torchrun starts its workers in their own
    sessions, so each worker is killed by pid, not through the launcher's process group."""
    for proc in launchers:
        if proc.poll() is None:
            pids = list(_workers(proc.pid).values())
            proc.kill()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()


def _two_nodes(dirs: list[Path], env: dict, timeout: float = 240) -> list[tuple[int, str, str]]:
    """Two `torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d` launchers, started as
    separate processes (one per directory) on this machine: (exit code, stdout, stderr) each."""
    port = free_port()
    args = [TORCHRUN_BIN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"gptcore-test-{port}", "-m", "stages.train"]
    nodes = [_launch(args, d, env) for d in dirs]
    try:
        outs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        _stop(*nodes)
    return [(node.returncode, out, err) for node, (out, err) in zip(nodes, outs)]


def _result(root: Path) -> dict:
    """What a finished run published: the weights, the run's metrics and validation log."""
    return {"weights": load_file(str(root / "models/best/model.safetensors")),
            "metrics": json.loads((root / "metrics/train.json").read_text()),
            "val_log": (root / "metrics/val_log.csv").read_text()}


def _assert_same_run(got: dict, want: dict) -> None:
    assert got["weights"].keys() == want["weights"].keys()
    differ = [k for k in want["weights"] if not torch.equal(got["weights"][k], want["weights"][k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ}"
    assert {k: got["metrics"][k] for k in SAME} == {k: want["metrics"][k] for k in SAME}
    assert got["val_log"] == want["val_log"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, mirror_dir):
    """A tiny project with data, a trained model and metrics from a first real run."""
    return trained_project(tmp_path_factory.mktemp("ddp") / "gptcore", mirror_dir)


@pytest.fixture(scope="module")
def reference(project):
    """One uninterrupted one-node two-process run of RESUMABLE, which the interrupted,
    elastic and two-node runs must reproduce exactly."""
    root, env = project
    write_params(root, RESUMABLE)
    ok(_torchrun(root, env))
    result = _result(root)
    assert result["metrics"]["steps"] == 100 and result["metrics"]["resumed_from_step"] == 0
    return result


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
    ok(run_stage("evaluate", root, env))


def test_torchrun_interrupted_run_resumes_bit_exactly(project, reference, tmp_path):
    root, env = project
    write_params(root, RESUMABLE)
    rc, out, err = signal_after_first_checkpoint(TORCHRUN, root, {**env, "OMP_NUM_THREADS": "1"},
                                                 signal.SIGTERM)
    assert rc != 0, out + err
    assert "state saved" in err, err
    (last,) = root.glob(".gptcore/runs/*/last")
    state = load_trainer_state(last)
    assert 10 <= state["step"] < 100 and len(state["ranks"]) == 2
    # As a process killed between the two renames of a resume save leaves it: only
    # <last>.old, the previous complete state. The rerun must resume from it all the same.
    last.rename(last.with_name("last.old"))

    # Two nodes that do not share the directory: the resume state is on one node's disk
    # only. The ranks must refuse to train two different runs, and touch nothing.
    other = copy_project(tmp_path / "node2")
    shutil.copytree(root / "data", other / "data")
    shutil.copy(root / "params.yaml", other / "params.yaml")
    before = snapshot(root)
    runs = _two_nodes([root, other], env)
    assert all(rc != 0 for rc, _, _ in runs), runs
    errors = "".join(err for _, _, err in runs)
    assert "the ranks found different resume checkpoints" in errors, errors
    assert f"step {state['step']}" in errors and ": none" in errors, errors
    assert snapshot(root) == before and load_trainer_state(last.with_name("last.old"))["step"] == state["step"]
    assert not (other / "models").exists() and not list(other.glob(".gptcore/runs/*/last*"))

    again = _torchrun(root, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from step {state['step']}" in again.stderr
    _assert_same_run(_result(root), reference)


# The rank torchrun loses: rank 0 is the one that writes checkpoints and holds the MLflow run.
KILLED = 0


def test_elastic_restart_after_a_rank_is_killed_resumes_bit_exactly(project, reference):
    """`torchrun --max-restarts 1`; a worker is SIGKILLed after the first resume checkpoint:
    torchrun restarts the group, the new group rendezvouses afresh (gptcore.training.distributed
    keeps it off the dead group's keys), resumes from the last resume checkpoint and ends
    bit-identical to the uninterrupted run."""
    root, env = project
    write_params(root, RESUMABLE)
    proc = _launch([TORCHRUN_BIN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                    "-m", "stages.train"], root, env)
    try:
        wait_for_first_checkpoint(proc, root, 180)
        workers = _workers(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[KILLED], signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        _stop(proc)
    assert proc.returncode == 0, out + err
    # torchrun saw the kill (its own log line) and restarted rather than gave up.
    assert f"(exitcode: -9) local_rank: {KILLED} (pid: {workers[KILLED]})" in err, err
    resumed = [int(n) for n in re.findall(r"resuming from step (\d+)", err)]
    assert len(resumed) == 1 and resumed[0] % 10 == 0 and 10 <= resumed[0] < 100, err
    got = _result(root)
    assert got["metrics"]["resumed_from_step"] == resumed[0]
    _assert_same_run(got, reference)
    assert not list(root.glob(".gptcore/runs/*"))  # the finished run was cleaned up


def test_two_launchers_rendezvous_as_two_nodes(project, reference):
    """Two `torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d` launchers, started
    separately in the same directory (as two nodes sharing a filesystem would), train one
    run together: the same run as one node's two processes, published once."""
    root, env = project
    write_params(root, RESUMABLE)
    runs = _two_nodes([root, root], env)
    for rc, out, err in runs:
        assert rc == 0, out + err
    # Rank 0 ran under exactly one of the launchers: only it published and reported.
    assert sorted("best val loss" in out for _, out, _ in runs) == [False, True], runs
    got = _result(root)
    assert got["metrics"]["resumed_from_step"] == 0
    _assert_same_run(got, reference)
    assert not list(root.glob(".gptcore/runs/*"))


PROBE = '''
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from gptcore.config import Params
from gptcore.data.dataset import TokenData
from gptcore.training.loop import Trainer
out, params = Path(sys.argv[1]), Params.from_dict(json.loads(sys.argv[2]))
trainer = Trainer(params, TokenData.load("data/processed"), out / "best", out / "last", progress=False)
batches, grads = [], []
draw = trainer.sampler.next
def next_batch():
    x, y = draw()
    batches.append((x.clone(), y.clone()))
    return x, y
trainer.sampler.next = next_batch
trainer.optimizer.register_step_pre_hook(
    lambda opt, args, kwargs: grads.append([p.grad.detach().clone() for p in trainer.model.parameters()]))
trainer.train()
every = [None] * dist.get_world_size()
dist.all_gather_object(every, batches)
if dist.get_rank() == 0:
    torch.save({"batches": every, "grads": grads}, out / "probe.pt")
'''


def test_ranks_draw_different_batches_and_gradients_are_averaged(project, tmp_path):
    """Two ranks at batch b give, at every step, the gradient of one process on both
    ranks' 2b windows: DDP averages, and each rank draws its own batches."""
    from gptcore.config import Params
    from gptcore.model import GPT
    from gptcore.training.optim import lr_at, make_optimizer, set_lr

    root, env = project
    params = Params.from_dict({**TINY_CHAR, "train": {**TINY_CHAR["train"], "max_steps": 3, "eval_interval": 3,
                                                 "checkpoint_interval": 10, "grad_clip": 0.0,
                                                 # AdamW: Muon's bf16 orthogonalisation would amplify
                                                 # rounding differences in later steps' weights
                                                 "optimizer": "adamw"}})
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           str(probe), str(tmp_path), json.dumps(params.to_dict())],
                          cwd=root, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = torch.load(tmp_path / "probe.pt", weights_only=True)
    per_rank, ddp_grads = got["batches"], got["grads"]
    assert len(per_rank) == 2 and len(per_rank[0]) == len(ddp_grads) == 3
    for (x0, _), (x1, _) in zip(*per_rank):
        assert x0.shape == (params.train.batch_size, params.model.block_size)
        assert not torch.equal(x0, x1)  # each rank draws its own windows

    # One process, the same initial weights, both ranks' windows as one batch of 2b.
    torch.manual_seed(params.train.seed)
    model = GPT(params.model)
    opt = make_optimizer(model, params.train)
    for step, ((x0, y0), (x1, y1)) in enumerate(zip(*per_rank)):
        set_lr(opt, lr_at(step, params.train))
        _, loss = model(torch.cat([x0, x1]), torch.cat([y0, y1]), return_logits=False,
                        label_smoothing=params.train.label_smoothing)  # the trainer's objective
        loss.backward()
        for (name, p), g in zip(model.named_parameters(), ddp_grads[step]):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        opt.step()
        opt.zero_grad(set_to_none=True)
