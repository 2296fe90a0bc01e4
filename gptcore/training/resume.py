"""Resume state: what identifies a training run, and the per-rank state that makes a
resumed run continue bit for bit.

A resume checkpoint is an ordinary checkpoint directory (:mod:`gptcore.checkpoint`) with
``trainer_state.pt``: the trainer's counters and logs, the optimizer, the weight average
(``train.ema_decay``), and under
``"ranks"`` each process's data position (its batch sampler's generator) and RNG
(dropout). It is only ever reused by the run with the same :func:`fingerprint`. SIGINT/SIGTERM
become a request (:func:`stop_requests`) that the trainer answers by saving this state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from ..config import Params

# Logging and checkpoint cadence do not change the weights, so a run may resume with them changed.
# Nor does compile: the compiled step computes the same function (to float rounding), and
# the checkpoint holds the uncompiled module's weights, so a run compiled on a GPU may be
# resumed eagerly (e.g. where compiling failed or is switched off) and vice versa. Bit-exact
# continuation needs the same setting, as it needs the same machine and thread count.
_NOT_IDENTITY = ("log_interval", "checkpoint_interval", "compile")


def fingerprint(params: Params, data_meta: dict, world_size: int = 1, init_digest: str | None = None) -> str:
    """Identifies a training run: a resume checkpoint is only reused for the same one.
    A fine-tune is identified by its init weights' content digest, not by how init_from
    spells their source (an alias that moves to another version is another run)."""
    train = {k: v for k, v in asdict(params.train).items() if k not in _NOT_IDENTITY and k != "init_from"}
    key = {"model": params.model.to_dict(), "train": train,
           "world_size": world_size,  # each rank draws its own batches: a different run
           "tokenizer": params.tokenizer.kind, "data": data_meta}
    if init_digest is not None:  # absent from scratch runs: their fingerprints stay what they were
        key["init"] = init_digest
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def rank_state(sampler, device: torch.device) -> dict:
    """What differs between ranks: each draws its own batches and dropout masks."""
    return {"sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def load_rank_state(state: dict, sampler, device: torch.device) -> None:
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:  # dropout on GPU
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def save(directory: str | Path, model: torch.nn.Module, tokenizer, state: dict[str, Any]) -> None:
    """Atomically write the weights and ``state`` (which must hold ``fingerprint`` and ``step``)."""
    save_checkpoint(directory, model, tokenizer,
                    meta={"step": state["step"], "fingerprint": state["fingerprint"]},
                    trainer_state=state)


def load(directory: str | Path, fingerprint: str, device: torch.device,
         attn_impl: str) -> tuple[dict, dict] | None:
    """``(model state_dict, trainer state)`` if ``directory`` holds this run's state, else None."""
    directory = Path(directory)
    state = load_trainer_state(directory) if directory.exists() else None
    if state is None or state.get("fingerprint") != fingerprint:
        return None
    model, _, _ = load_checkpoint(directory, device=device, attn_impl=attn_impl)
    return model.state_dict(), state


def clear(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def stop_requests():
    """Turn SIGINT/SIGTERM into a flag checked between steps, so state is saved cleanly.
    A second signal gives up at once."""
    flag: dict = {}

    def handler(signum, _frame):
        if flag.get("stop"):
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
