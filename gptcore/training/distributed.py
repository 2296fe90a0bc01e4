"""Multi-process training under ``torchrun``: which process this is, and the few
collective operations the trainer needs.

Each process reads its place from the environment torchrun sets (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``). On GPUs, a process binds to ``cuda:LOCAL_RANK``
(``torch.cuda.set_device``) *before* the NCCL process group exists and before any
tensor is made, so every rank's model, batches and collectives live on its own GPU.
"""

from __future__ import annotations

import os
import time
import uuid
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
        import torch.distributed as td  # here and below: only under torchrun (kept out of plain runs)

        if not td.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                td.init_process_group(backend, store=_fresh_store(dist), rank=dist.rank,
                                      world_size=dist.world_size)
            else:
                td.init_process_group(backend)
    return dist, device


def _fresh_store(dist: Dist):
    """The launcher's store, under a namespace that this incarnation of the group alone uses.

    Why: torchrun (c10d rendezvous, torch 2.13) keeps one store for the workers across
    restarts (``--max-restarts``, a node joining) and ``init_process_group`` keys its
    address exchange by rank alone, so after a restart a rank reads the dead ranks'
    addresses and gloo/NCCL hang in connect until the group's timeout
    (``default_pg_timeout``): the restarted group never trains. A per-restart
    prefix from ``TORCHELASTIC_RESTART_COUNT`` is not enough: each node counts its own
    restarts, and a node restarted by a membership change does not count it. So the
    ranks agree on a fresh namespace through the store in a way stale keys cannot
    fool: each rank posts a nonce of its own and waits for rank 0 to answer that
    nonce; rank 0 answers every nonce posted (stale ones harmlessly) until all of this
    group's ranks have acknowledged its namespace.
    """
    import torch.distributed as td
    from torch.distributed.constants import default_pg_timeout

    env = os.environ
    store = td.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), dist.world_size, is_master=False,
                        timeout=default_pg_timeout)
    if dist.rank == 0:
        namespace = uuid.uuid4().hex
        acks, answered = f"gptcore/acks/{namespace}", 0
        deadline = time.monotonic() + default_pg_timeout.total_seconds()
        while store.add(acks, 0) < dist.world_size - 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {store.add(acks, 0) + 1} of {dist.world_size} ranks joined")
            posted = store.get("gptcore/joining").decode().split() if store.check(["gptcore/joining"]) else []
            for nonce in posted[answered:]:
                store.set(f"gptcore/namespace/{nonce}", namespace)
            answered = len(posted)
            time.sleep(0.01)
    else:
        nonce = uuid.uuid4().hex
        store.append("gptcore/joining", nonce + " ")
        namespace = store.get(f"gptcore/namespace/{nonce}").decode()  # waits for rank 0's answer
        store.add(f"gptcore/acks/{namespace}", 1)
    return td.PrefixStore(f"gptcore/{namespace}/", store)


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
