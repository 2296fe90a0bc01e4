"""Multi-process training under ``torchrun``: which process this is, and the few
collective operations the trainer needs.

Each process reads its place from the environment torchrun sets (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``). On GPUs, a process binds to ``cuda:LOCAL_RANK``
(``torch.cuda.set_device``) *before* the NCCL process group exists and before any
tensor is made, so every rank's model, batches and collectives live on its own GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .device import resolve_device


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> Dist:
    env = os.environ
    return Dist(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Pick this process's device and, under torchrun, join the process group."""
    dist = from_env()
    device = resolve_device(device_name, dist.local_rank if dist.enabled else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL init: its communicator binds to this GPU
    if dist.enabled:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over ``model`` (already on ``device``): averages gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def any_rank(flag: bool, dist: Dist, device: torch.device) -> bool:
    """True on every rank if it is true on any (early stop and signals must be collective)."""
    if not dist.enabled:
        return flag
    import torch.distributed as td

    t = torch.tensor([int(flag)], device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def gather(obj, dist: Dist) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.enabled:
        return [obj]
    import torch.distributed as td

    out = [None] * dist.world_size
    td.all_gather_object(out, obj)
    return out
