"""Training: AdamW, warmup + cosine LR, gradient accumulation and clipping, periodic
validation, early stopping, best-checkpoint keeping, and bit-exact resume.

The whole training state — model, optimizer, step (which fixes the LR schedule),
data position (the batch sampler's generator), the global RNG (dropout), early-stopping
counters, logs and the MLflow run id — is saved together in a resume checkpoint. A run
interrupted at any point and resumed from it continues exactly as if it had never
stopped: same batches, same weights, bit for bit (on the same machine and thread count).

Under ``torchrun`` each rank draws its own batches (seed + rank) and rank 0 alone
evaluates and writes; gradients are averaged by DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from .config import ConfigError, Params
from .data import BatchSampler, TokenData
from .io import atomic_write_json, atomic_write_text
from .model import GPT
from .perf import keep_freed_memory


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed."""


@dataclass
class TrainResult:
    best_val_loss: float
    final_val_loss: float
    best_step: int
    steps: int
    tokens_seen: int
    tokens_per_s: float
    train_time_s: float  # time inside training steps (what tokens_per_s is measured over)
    wall_time_s: float  # the whole run on the clock, evaluations and checkpoints included
    stopped_early: bool
    resumed_from_step: int
    num_parameters: int
    train_log: list = field(default_factory=list)  # [step, train_loss, lr, tokens_per_s]
    val_log: list = field(default_factory=list)  # [step, val_loss]

    def metrics(self) -> dict:
        d = asdict(self)
        d.pop("train_log")
        d.pop("val_log")
        return d


def lr_at(step: int, params: Params) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_lr`` at ``max_steps``."""
    cfg = params.train
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: GPT, params: Params) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (incl. embeddings) only, not on biases or norms."""
    cfg = params.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def fingerprint(params: Params, data_meta: dict) -> str:
    """Identifies a training run: a resume checkpoint is only reused for the same one."""
    # Logging and checkpoint cadence do not change the weights, so they may differ on resume.
    train = {k: v for k, v in asdict(params.train).items()
             if k not in ("log_interval", "checkpoint_interval")}
    key = {"model": params.model.to_dict(), "train": train,
           "world_size": int(os.environ.get("WORLD_SIZE", 1)),  # each rank's data stream differs
           "tokenizer": params.tokenizer.kind, "data": data_meta}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


@contextlib.contextmanager
def _catch_stop_signals(flag: dict):
    """Turn SIGINT/SIGTERM into a flag checked between steps, so state is saved cleanly."""
    def handler(signum, _frame):
        if flag.get("stop"):  # second signal: give up immediately
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name
    if threading_main():
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    else:
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class Trainer:
    def __init__(self, params: Params, data: TokenData, best_dir: str | Path,
                 resume_dir: str | Path, tracker=None, run_params: dict | None = None,
                 progress: bool = True) -> None:
        self.params = params
        self.cfg = params.train
        self.data = data
        self.best_dir, self.resume_dir = Path(best_dir), Path(resume_dir)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.is_main = self.rank == 0
        self.tracker = tracker if self.is_main else None
        self.run_params = run_params or {}
        self.progress = progress
        self.device = resolve_device(self.cfg.device)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        if data.tokenizer.vocab_size > params.model.vocab_size:
            raise ConfigError(f"model.vocab_size={params.model.vocab_size} is smaller than the "
                              f"tokenizer's {data.tokenizer.vocab_size} ids")
        self.fingerprint = fingerprint(params, data.meta)

        torch.manual_seed(self.cfg.seed)
        self.model = GPT(params.model).to(self.device)
        if self.world > 1:  # same initial weights everywhere, but each rank its own dropout
            torch.manual_seed(self.cfg.seed + self.rank)
        self.optimizer = make_optimizer(self.model, params)
        bs, T = self.cfg.batch_size, params.model.block_size
        self.sampler = BatchSampler(data.train, T, bs, seed=self.cfg.seed + 1 + self.rank)
        self.step = 0
        self.best_val = math.inf
        self.best_step = -1
        self.last_val = math.nan
        self.bad_evals = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self.wall_time = 0.0  # accumulated across resumed segments
        self._segment_start = time.monotonic()
        self.train_log: list[list[float]] = []
        self.val_log: list[list[float]] = []
        self.run_id: str | None = None
        self.complete = False
        self.resumed_from = 0
        self._ddp = None
        if self.world > 1:
            self._setup_ddp()

    # -- distributed ------------------------------------------------------------------
    def _setup_ddp(self) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            self.model.to(self.device)
        self._ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _all_agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (early stop and signals must be collective)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything rank 0 knows; per-rank state (data position, RNG) is under "ranks"."""
        return {
            "fingerprint": self.fingerprint, "world_size": self.world, "step": self.step,
            "best_val": self.best_val, "best_step": self.best_step, "last_val": self.last_val,
            "bad_evals": self.bad_evals, "tokens_seen": self.tokens_seen,
            "train_time": self.train_time, "wall_time": self._wall_now(),
            "optimizer": self.optimizer.state_dict(),
            "train_log": self.train_log, "val_log": self.val_log, "run_id": self.run_id,
            "complete": self.complete,
        }

    def _wall_now(self) -> float:
        return self.wall_time + time.monotonic() - self._segment_start

    def _rank_state(self) -> dict:
        """What differs between ranks: each draws its own batches and dropout masks."""
        return {"sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def _load_rank_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:  # dropout on GPU
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def try_resume(self) -> bool:
        """Restore from the resume checkpoint if it belongs to this exact run."""
        state = load_trainer_state(self.resume_dir) if self.resume_dir.exists() else None
        if state is None or state.get("fingerprint") != self.fingerprint or state.get("complete"):
            return False
        model, _, _ = load_checkpoint(self.resume_dir, device=self.device,
                                      attn_impl=self.params.model.attn_impl)
        self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_rank_state(state["ranks"][self.rank])  # the fingerprint fixes the world size
        for key in ("step", "best_val", "best_step", "last_val", "bad_evals", "tokens_seen",
                    "train_time", "wall_time", "train_log", "val_log", "run_id"):
            setattr(self, key, state[key])
        self.resumed_from = self.step
        return True

    def save_resume(self) -> None:
        """Collective under torchrun: every rank contributes its state, rank 0 writes."""
        ranks = [self._rank_state()]
        if self.world > 1:
            import torch.distributed as dist
            ranks = [None] * self.world
            dist.all_gather_object(ranks, self._rank_state())
        if self.is_main:
            save_checkpoint(self.resume_dir, self.model, self.data.tokenizer,
                            meta={"step": self.step, "fingerprint": self.fingerprint},
                            trainer_state={**self.state_dict(), "ranks": ranks})

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def estimate_val_loss(self) -> float:
        """Mean loss on ``eval_batches`` fixed validation batches (same batches every time)."""
        self.model.eval()
        n = min(self.cfg.eval_batches, 1 + len(self.data.val) // self.params.model.block_size)
        sampler = BatchSampler(self.data.val, self.params.model.block_size,
                               self.cfg.batch_size, seed=self.cfg.seed + 10_000)
        total = 0.0
        for _ in range(n):
            x, y = sampler.next()
            with autocast(self.device, self.cfg.dtype):
                loss = self.model.loss(x.to(self.device), y.to(self.device))
            total += loss.item()
        self.model.train()
        return total / n

    # -- the loop ---------------------------------------------------------------------
    def _train_step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        module = self._ddp or self.model
        accum = self.cfg.grad_accum_steps
        total = 0.0
        for micro in range(accum):
            x, y = self.sampler.next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = self._ddp is None or micro == accum - 1
            ctx = contextlib.nullcontext() if sync else self._ddp.no_sync()
            with ctx:
                with autocast(self.device, self.cfg.dtype):
                    _, loss = module(x, y, return_logits=False)
                (loss / accum).backward()
            total += loss.item()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / accum

    def _evaluate_and_checkpoint(self) -> bool:
        """Validate, keep the best model, update patience. Returns True to stop early."""
        val = self.estimate_val_loss()
        self.last_val = val
        self.val_log.append([self.step, val])
        improved = val < self.best_val
        if improved:
            self.best_val, self.best_step, self.bad_evals = val, self.step, 0
            save_checkpoint(self.best_dir, self.model, self.data.tokenizer,
                            meta={"step": self.step, "val_loss": val, "fingerprint": self.fingerprint})
        else:
            self.bad_evals += 1
        if self.tracker is not None:
            self.tracker.log_metrics({"val_loss": val, "best_val_loss": self.best_val}, step=self.step)
        self._say(f"step {self.step}: val_loss {val:.4f}{' (best)' if improved else ''}")
        return self.cfg.patience > 0 and self.bad_evals >= self.cfg.patience

    def _say(self, msg: str) -> None:
        if self.is_main and self.progress:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stderr)

    def train(self) -> TrainResult:
        from tqdm import tqdm

        cfg = self.cfg
        self._segment_start = time.monotonic()
        if self.try_resume():
            self._say(f"resuming from step {self.step} ({self.resume_dir})")
        if self.tracker is not None:
            self.tracker.start(self.run_params, tags={"stage": "train"}, run_id=self.run_id)
            self.run_id = self.tracker.run_id
        tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * self.params.model.block_size * self.world
        stop = {}
        stopped_early = False
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   file=sys.stderr, disable=not (self.is_main and self.progress) or None,
                   dynamic_ncols=True)
        self.model.train()
        with _catch_stop_signals(stop), bar:
            while self.step < cfg.max_steps:
                lr = lr_at(self.step, self.params)
                t0 = time.perf_counter()
                loss = self._train_step(lr)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.train_time += dt
                self.step += 1
                self.tokens_seen += tokens_per_step
                tps = tokens_per_step / dt
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss} at step {self.step}; lower "
                                             "train.learning_rate or enable train.grad_clip")
                self.train_log.append([self.step, loss, lr, tps])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                if self.tracker is not None and (self.step % cfg.log_interval == 0 or self.step == 1):
                    self.tracker.log_metrics({"train_loss": loss, "lr": lr, "tokens_per_s": tps},
                                             step=self.step)
                at_end = self.step == cfg.max_steps
                if self.step % cfg.eval_interval == 0 or at_end:
                    early = self.is_main and self._evaluate_and_checkpoint()
                    if self._all_agree(early):
                        stopped_early = True
                        self._say(f"early stop: no improvement in {cfg.patience} evaluations")
                        break
                if self.step % cfg.checkpoint_interval == 0 and not at_end:
                    self.save_resume()
                if self._all_agree(bool(stop)) and self.step < cfg.max_steps:
                    stop.setdefault("stop", "signal on another rank")
                    self.save_resume()
                    raise TrainingInterrupted(
                        f"{stop['stop']} at step {self.step}: state saved to {self.resume_dir}; "
                        "run again to resume")
        self.complete = True
        return TrainResult(
            best_val_loss=self.best_val, final_val_loss=self.last_val, best_step=self.best_step,
            steps=self.step, tokens_seen=self.tokens_seen,
            tokens_per_s=self.tokens_seen / max(self.train_time, 1e-9),
            train_time_s=self.train_time, wall_time_s=self._wall_now(), stopped_early=stopped_early,
            resumed_from_step=self.resumed_from, num_parameters=self.model.num_parameters(),
            train_log=self.train_log, val_log=self.val_log)


def write_train_outputs(result: TrainResult, metrics_dir: str | Path) -> None:
    """``train.json`` (summary) and the per-step CSV logs that ``dvc plots`` draws."""
    metrics_dir = Path(metrics_dir)
    atomic_write_json(metrics_dir / "train.json", result.metrics())
    for name, header, rows in (("train_log.csv", ["step", "train_loss", "lr", "tokens_per_s"], result.train_log),
                               ("val_log.csv", ["step", "val_loss"], result.val_log)):
        lines = [",".join(header)] + [",".join(_fmt(v) for v in row) for row in rows]
        atomic_write_text(metrics_dir / name, "\n".join(lines) + "\n")


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.6g}"


def clear_resume(resume_dir: str | Path) -> None:
    shutil.rmtree(resume_dir, ignore_errors=True)
