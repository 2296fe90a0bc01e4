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


PROBE = '''
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from gptcore.config import Params
from gptcore.dataset import TokenData
from gptcore.train import Trainer

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
    from gptcore.optim import lr_at, make_optimizer, set_lr
    from test_faults import TINY

    root, env = project
    params = Params.from_dict({**TINY, "train": {**TINY["train"], "max_steps": 3, "eval_interval": 3,
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
        _, loss = model(torch.cat([x0, x1]), torch.cat([y0, y1]), return_logits=False)
        loss.backward()
        for (name, p), g in zip(model.named_parameters(), ddp_grads[step]):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        opt.step()
        opt.zero_grad(set_to_none=True)
