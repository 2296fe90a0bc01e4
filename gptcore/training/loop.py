"""Training: the loop. Muon + AdamW (or AdamW alone) on a warmup + cosine or WSD LR schedule,
from random weights or an init model (:mod:`.init_from`), gradient accumulation and clipping,
periodic validation (of the weight average, where one is kept), early stopping, keeping the
best checkpoint, and bit-exact resume. Beside it: the optimizer and schedule (:mod:`.optim`),
batches (:mod:`gptcore.data.dataset`), device and precision (:mod:`.device`), torchrun
(:mod:`.distributed`), the resume state (:mod:`.resume`), the weight average (:mod:`.averaging`).
:meth:`Trainer.train` reads top to bottom: batch, forward, backward, clip, step, log,
evaluate, checkpoint.

The whole training state (model, optimizer, weight average, step, data position, RNG,
early-stopping counters, logs, MLflow run id) is saved together, so an interrupted run continues
exactly as if it had never stopped, bit for bit (on the same machine and thread count). Under
``torchrun`` each rank draws its own batches (seed + rank) and rank 0 alone evaluates and
writes; DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..config import Params
from ..data.dataset import BatchSampler, TokenData
from ..errors import CheckpointError, ConfigError, TrainingInterrupted, first_line
from ..io import current_dir
from ..model import GPT
from . import distributed, resume
from .averaging import WeightAverage
from .device import autocast, keep_freed_memory, resolve_precision
from .metrics import TrainResult, check_finite
from .optim import lr_at, make_optimizer, momentum_at, set_lr

__all__ = ["Trainer", "TrainResult", "TrainingInterrupted"]

@dataclass
class RunState:
    """The counters and logs that, with the optimizer and per-rank state, make up a
    resumable run: saved and restored as one (their names are the resume file's keys)."""

    step: int = 0
    best_val: float = math.inf
    best_step: int = -1
    last_val: float = math.nan
    bad_evals: int = 0
    tokens_seen: int = 0
    train_time: float = 0.0  # inside training steps: what tokens/s is measured over
    wall_time: float = 0.0  # accumulated across resumed segments
    train_log: list = field(default_factory=list)  # [step, train_loss, lr, tokens_per_s]
    val_log: list = field(default_factory=list)  # [step, val_loss]
    run_id: str | None = None


class Trainer:
    def __init__(self, params: Params, data: TokenData, best_dir: str | Path,
                 resume_dir: str | Path, tracker=None, run_params: dict | None = None,
                 progress: bool = True, init=None) -> None:
        self.params, self.cfg, self.data = params, params.train, data
        self.best_dir, self.resume_dir = Path(best_dir), Path(resume_dir)
        if data.tokenizer.vocab_size > params.model.vocab_size:
            raise ConfigError(f"model.vocab_size={params.model.vocab_size} is smaller than the "
                              f"tokenizer's {data.tokenizer.vocab_size} ids")
        self.dist, self.device = distributed.setup(self.cfg.device)
        self.is_main = self.dist.is_main
        self.tracker = tracker if self.is_main else None
        self.run_params = run_params or {}
        self.progress = progress
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.init = init  # an init_from.Init: the weights to start from (None: random, from the seed)
        self.fingerprint = resume.fingerprint(params, data.meta, self.dist.world_size,
                                              init.digest if init is not None else None)

        self._build_model()
        # On CUDA a .item() per step would make the host wait for the GPU: losses stay on the
        # device until log_interval, an evaluation, a checkpoint or a stop. On CPU: read at once.
        self.defer_sync = self.device.type == "cuda"
        self._pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss, lr) not yet read
        self._window_start = 0.0  # when the first of the pending steps began
        self.sampler = BatchSampler(data.train, params.model.block_size, self.cfg.batch_size,
                                    seed=self.cfg.seed + 1 + self.dist.rank, name="train split")
        self._val_sampler()  # a val split too short for block_size fails now, not at the first evaluation
        self.state = RunState()
        self._segment_start = time.monotonic()
        self.resumed_from = 0

    def _build_model(self) -> None:
        """The model, its optimizer, precision and what the training step calls."""
        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank...
        self.model = GPT(self.params.model)
        if self.init is not None:
            self.model.load_state_dict(self.init.state)
        self.model.to(self.device)
        if self.dist.enabled:  # ...but each rank its own dropout masks
            torch.manual_seed(self.cfg.seed + self.dist.rank)
        self.optimizer = make_optimizer(self.model, self.cfg)
        # Rank 0 alone validates and publishes, so only it keeps the average.
        averaging = self.cfg.ema_decay > 0 and self.is_main
        self.average = WeightAverage(self.model, self.cfg.ema_decay, self.cfg.ema_warmup) if averaging else None
        self.dtype, note = resolve_precision(self.device, self.cfg.dtype)
        if note:
            self._say(note)
        # float16's narrow range underflows small gradients unless the loss is scaled up
        # (bfloat16 and float32 need no scaler: disabled, it is a no-op).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        # What the training step calls (_forward): the model, DDP-wrapped under torchrun,
        # compiled where compile is on; all share ``self.model``'s weights.
        self._ddp = distributed.wrap(self.model, self.device) if self.dist.enabled else None
        self._compile_pending = self._wants_compile()
        self._compiled = torch.compile(self._plain_step_module()) if self._compile_pending else None

    # -- resume state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything rank 0 knows; per-rank state (data position, RNG) is added under "ranks"."""
        progress = {**asdict(self.state), "wall_time": self._wall_now()}
        return {"fingerprint": self.fingerprint, "world_size": self.dist.world_size,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),  # {} unless float16: the loss scale and its growth count
                "average": self.average.state_dict() if self.average is not None else None,
                **progress}

    def _wall_now(self) -> float:
        return self.state.wall_time + time.monotonic() - self._segment_start

    def try_resume(self) -> bool:
        """Restore from the resume checkpoint if it belongs to this exact run."""
        # current_dir: a rank killed between a resume save's two renames leaves only
        # <resume_dir>.old, the last complete state; read in place (rank 0's next save moves it
        # back), else the restarted group would silently start over from step 0.
        found = resume.load(current_dir(self.resume_dir), self.fingerprint, self.device,
                            self.params.model.attn_impl)
        if found is None:
            return False
        weights, state = found
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # without it a float16 run would restart at the initial scale
            self.scaler.load_state_dict(state["scaler"])
        if self.average is not None:  # ema_decay is in the fingerprint: rank 0's state has one
            self.average.load_state_dict(state["average"])
        # The fingerprint fixes the world size, so there is one entry per rank.
        resume.load_rank_state(state["ranks"][self.dist.rank], self.sampler, self.device)
        self.state = RunState(**{f.name: state[f.name] for f in fields(RunState)})
        self.resumed_from = self.state.step
        return True

    def save_resume(self) -> None:
        """Collective under torchrun: every rank contributes its state, rank 0 writes."""
        ranks = distributed.gather(resume.rank_state(self.sampler, self.device), self.dist)
        if self.is_main:
            resume.save(self.resume_dir, self.model, self.data.tokenizer,
                        {**self.state_dict(), "ranks": ranks})

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def estimate_val_loss(self) -> float:
        """Mean loss on ``eval_batches`` fixed validation batches (same batches every time)."""
        self.model.eval()
        n = min(self.cfg.eval_batches, 1 + len(self.data.val) // self.params.model.block_size)
        sampler = self._val_sampler()
        total = 0.0
        for _ in range(n):
            x, y = sampler.next()
            with autocast(self.device, self.dtype):
                total += self.model.loss(x.to(self.device), y.to(self.device)).item()
        self.model.train()
        return total / n

    def _val_sampler(self) -> BatchSampler:
        """The same validation batches at every evaluation: a fresh sampler, a fixed seed."""
        return BatchSampler(self.data.val, self.params.model.block_size, self.cfg.batch_size,
                            seed=self.cfg.seed + 10_000, name="val split")

    def _evaluate(self) -> bool:
        """Validate, keep the best model, update patience. Returns True to stop early.
        With a weight average, the average is what is validated and published."""
        with self.average.applied() if self.average is not None else contextlib.nullcontext():
            val = self.estimate_val_loss()
            self.state.last_val = val
            self.state.val_log.append([self.state.step, val])
            improved = val < self.state.best_val
            if improved:
                self.state.best_val, self.state.best_step, self.state.bad_evals = val, self.state.step, 0
                save_checkpoint(self.best_dir, self.model, self.data.tokenizer,
                                meta={"step": self.state.step, "val_loss": val, "fingerprint": self.fingerprint})
        if not improved:
            self.state.bad_evals += 1
        if self.tracker is not None:
            self.tracker.log_metrics({"val_loss": val, "best_val_loss": self.state.best_val}, step=self.state.step)
        kind = "val_loss (weight average)" if self.average is not None else "val_loss"
        self._say(f"step {self.state.step}: {kind} {val:.4f}{' (best)' if improved else ''}")
        return self.cfg.patience > 0 and self.state.bad_evals >= self.cfg.patience

    # -- the loop ---------------------------------------------------------------------
    def _wants_compile(self) -> bool:
        want = self.cfg.compile
        if want == "auto":
            # On CPU compiling bought memory, not speed; on CUDA it speeds the step (docs/devices.md).
            want = self.device.type == "cuda"
        if not want:
            return False
        try:
            import torch._dynamo  # only when compile is asked for: dynamo is slow to import

            torch._dynamo.eval_frame.check_if_dynamo_supported()  # e.g. a Python newer than this torch
        except Exception as exc:  # noqa: BLE001 - any reason means: train eagerly, say why
            self._say(f"train.compile: torch.compile is unavailable ({first_line(exc)}); training eagerly")
            return False
        return True

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            # From pinned host memory the copy is asynchronous: the host samples the next
            # batch while the GPU still works on this one.
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _forward(self, x: torch.Tensor, y: torch.Tensor):
        """The training forward pass: compiled where compile is on (and did not fail),
        through DDP under torchrun (it averages the gradients), else the model itself."""
        # `is not None`, not `or`: a module's truth value would ask it for its len().
        module = self._compiled if self._compiled is not None else self._plain_step_module()
        return module(x, y, return_logits=False, label_smoothing=self.cfg.label_smoothing)

    def _plain_step_module(self) -> torch.nn.Module:
        return self._ddp if self._ddp is not None else self.model

    def _train_step(self, lr: float) -> float | torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss
        (a float, or with ``defer_sync`` a device tensor that :meth:`_flush` reads later)."""
        set_lr(self.optimizer, lr, momentum_at(self.state.step, self.cfg))
        accum = self.cfg.grad_accum_steps
        total = 0.0
        for micro in range(accum):
            x, y = self._to_device(*self.sampler.next())
            # Under DDP, average gradients across ranks only on the last micro-batch.
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or self._ddp is None else self._ddp.no_sync()
            with sync:
                with autocast(self.device, self.dtype):
                    _, loss = self._forward(x, y)
                self.scaler.scale(loss / accum).backward()
            total += loss.detach() if self.defer_sync else loss.item()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        # float16: skips the update if a gradient overflowed, and then lowers the scale.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update()
        return total / accum

    def _compiling_step(self, lr: float) -> float | torch.Tensor:
        """The first step with compile on: graph capture and code generation happen here.
        If they fail (no C++ compiler, an unsupported op), undo the step's side effects and
        take it eagerly, so the run stays what it would have been without compile."""
        self._compile_pending = False
        before = resume.rank_state(self.sampler, self.device)  # the batch and dropout RNG
        t0 = time.perf_counter()
        try:
            loss = self._train_step(lr)
        except Exception as exc:  # noqa: BLE001 - a real error recurs in the eager retry below
            self.optimizer.zero_grad(set_to_none=True)
            resume.load_rank_state(before, self.sampler, self.device)
            self._compiled = None
            self._say(f"train.compile: torch.compile failed at the first step ({type(exc).__name__}: "
                      f"{first_line(exc)}); training eagerly")
            return self._train_step(lr)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once: the warm-up is host and GPU time
        self._say(f"compiled in {time.perf_counter() - t0:.1f} s (first step, included in train time)")
        return loss

    def train(self) -> TrainResult:
        """Train to ``max_steps`` (or an early stop) from where the resume state left off."""
        self._begin()  # may replace self.state with the resumed one
        cfg, st = self.cfg, self.state
        tokens_per_step = (cfg.batch_size * cfg.grad_accum_steps * self.params.model.block_size
                           * self.dist.world_size)
        stopped_early = False
        bar = tqdm(total=cfg.max_steps, initial=st.step, desc="train", unit="step", file=sys.stderr,
                   disable=not (self.is_main and self.progress) or None, dynamic_ncols=True)
        self.model.train()
        with resume.stop_requests() as stop, bar:
            while st.step < cfg.max_steps:
                lr = lr_at(st.step, cfg)
                t0 = time.perf_counter()
                if not self._pending:  # deferred: a window of steps is timed, from its first step
                    self._window_start = t0
                loss = self._compiling_step(lr) if self._compile_pending else self._train_step(lr)
                dt = time.perf_counter() - t0
                st.step += 1
                st.tokens_seen += tokens_per_step
                at_end = st.step == cfg.max_steps
                evaluating = st.step % cfg.eval_interval == 0 or at_end
                checkpointing = st.step % cfg.checkpoint_interval == 0 and not at_end
                if self.defer_sync:
                    self._pending.append((st.step, loss, lr))
                    if st.step % cfg.log_interval == 0 or evaluating or checkpointing:
                        self._flush(bar, tokens_per_step)
                else:
                    st.train_time += dt
                    check_finite(st.step, loss, st.best_step, self.best_dir, self.cfg)
                    self._log_step(bar, loss, lr, tokens_per_step / dt)
                if evaluating and distributed.any_rank(self.is_main and self._evaluate(), self.dist, self.device):
                    stopped_early = True
                    self._say(f"early stop: no improvement in {cfg.patience} evaluations")
                    break
                if checkpointing:
                    self.save_resume()
                if not at_end:
                    self._stop_if_asked(stop, bar, tokens_per_step)
        return self._result(stopped_early)

    def _begin(self) -> None:
        """Resume if this run's state exists (every rank from the same step), then start or
        re-attach its MLflow run."""
        self._segment_start = time.monotonic()
        if self.try_resume():
            self._say(f"resuming from step {self.state.step} ({self.resume_dir})")
        # On several machines each rank reads its own disk's resume checkpoint; a rank that
        # found another step would train another run, into mixed-up collectives or a hang.
        steps = distributed.gather(self.state.step, self.dist)
        if len(set(steps)) > 1:
            found = ", ".join(f"rank {r}: {f'step {s}' if s else 'none'}" for r, s in enumerate(steps))
            raise CheckpointError(f"{self.resume_dir}: the ranks found different resume checkpoints ({found}); "
                                  "under torchrun on several machines keep the project directory (at least "
                                  ".gptcore/) on a filesystem every node shares, or delete .gptcore/runs "
                                  "on every node to start over")
        if self.tracker is not None:
            fresh = self.state.run_id is None
            self.tracker.start(self.run_params, tags={"stage": "train", "gptcore.fingerprint": self.fingerprint},
                               run_id=self.state.run_id)
            self.state.run_id = self.tracker.run_id
            if fresh:  # a resumed run already has its inputs
                self.tracker.log_datasets(self.data.describe())
                self.tracker.set_tags(self.init.tags if self.init is not None else {})
        if self.init is not None and not self.state.val_log and self.is_main:
            self._evaluate()  # step 0: the init model's own loss here, and the best until beaten

    def _stop_if_asked(self, stop: dict, bar, tokens_per_step: int) -> None:
        """After a SIGINT/SIGTERM (on any rank): save the state and end the run, resumable."""
        # Asking the other ranks is a collective: with deferred losses, only after a flush.
        if self.dist.enabled and self._pending:
            return
        if distributed.any_rank(bool(stop), self.dist, self.device):
            self._flush(bar, tokens_per_step)  # the state saved holds every step's row
            self.save_resume()
            raise TrainingInterrupted(
                f"{stop.get('stop', 'signal on another rank')} at step {self.state.step}: state saved "
                f"to {self.resume_dir}; run again to resume")

    def _result(self, stopped_early: bool) -> TrainResult:
        st = self.state
        meta = self.data.meta
        # train_bytes: data tokenized before it existed counted characters only (equal for ASCII text).
        bytes_per_token = meta.get("train_bytes", meta.get("train_chars", 0)) / max(meta.get("train_tokens", 0), 1)
        tokens_per_s = st.tokens_seen / max(st.train_time, 1e-9)
        return TrainResult(
            best_val_loss=st.best_val, final_val_loss=st.last_val, best_step=st.best_step,
            steps=st.step, tokens_seen=st.tokens_seen, tokens_per_s=tokens_per_s,
            train_time_s=st.train_time, wall_time_s=self._wall_now(), stopped_early=stopped_early,
            resumed_from_step=self.resumed_from, num_parameters=self.model.num_parameters(),
            device=self.device.type, dtype=self.dtype, bytes_per_s=tokens_per_s * bytes_per_token,
            train_log=st.train_log, val_log=st.val_log)

    def _flush(self, bar, tokens_per_step: int) -> None:
        """Read the deferred step losses in one transfer, then check and log each step as
        the undeferred loop does. Throughput is the window's: steps x tokens / its time."""
        if not self._pending:
            return
        losses = torch.stack([loss for _, loss, _ in self._pending]).tolist()  # the one host sync
        dt = time.perf_counter() - self._window_start
        self.state.train_time += dt
        rate = tokens_per_step * len(losses) / dt
        pending, self._pending = self._pending, []
        for (step, _, lr), loss in zip(pending, losses):
            check_finite(step, loss, self.state.best_step, self.best_dir, self.cfg)
            self._log_step(bar, loss, lr, rate, step)

    def _log_step(self, bar, loss: float, lr: float, tokens_per_s: float, step: int | None = None) -> None:
        step = self.state.step if step is None else step
        self.state.train_log.append([step, loss, lr, tokens_per_s])
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if self.tracker is not None and (step % self.cfg.log_interval == 0 or step == 1):
            self.tracker.log_metrics({"train_loss": loss, "lr": lr, "tokens_per_s": tokens_per_s},
                                     step=step)

    def _say(self, msg: str) -> None:
        if self.is_main and self.progress:
            tqdm.write(msg, file=sys.stderr)
