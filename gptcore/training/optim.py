"""The optimizer and the learning-rate schedule.

``train.optimizer: adamw`` is AdamW on every parameter. ``muon`` is Muon (orthogonalised
momentum, ``torch.optim.Muon``) for the 2-D matrices inside the transformer blocks and
AdamW for the rest (embeddings, LayerNorms, biases): Muon is defined for hidden weight
matrices only, and the embedding is a lookup table, not a linear map whose updates benefit
from orthogonalisation. One schedule (:func:`lr_at`) drives both: AdamW's groups run at
their ``lr_scale`` x the scheduled ``learning_rate``, Muon at ``muon_lr_scale`` x it (3 by
default). Muon's step is already rescaled to AdamW's update size
(``adjust_lr_fn="match_rms_adamw"``), so that multiplier is a swept choice (docs/results.md),
not a conversion between the two optimizers' units.
"""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``learning_rate``, then (``schedule: cosine``) cosine decay to
    ``min_lr`` at ``max_steps``, or (``wsd``: warmup-stable-decay) ``learning_rate`` until
    the last ``cooldown_fraction`` of ``max_steps`` and a linear cooldown to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        cooldown = max(1.0, cfg.cooldown_fraction * cfg.max_steps)
        progress = min(1.0, max(0.0, (step - (cfg.max_steps - cooldown)) / cooldown))
        return cfg.learning_rate - progress * (cfg.learning_rate - cfg.min_lr)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def momentum_at(step: int, cfg: TrainConfig) -> float:
    """Muon's momentum at ``step``: ``min(0.85, muon_momentum)`` at step 0, rising linearly
    to ``muon_momentum`` at step ``muon_momentum_warmup`` and constant from then on (so
    from the start when the warm-up is 0)."""
    if step >= cfg.muon_momentum_warmup:
        return cfg.muon_momentum
    start = min(0.85, cfg.muon_momentum)
    return start + (cfg.muon_momentum - start) * step / cfg.muon_momentum_warmup


def set_lr(optimizer, lr: float, momentum: float | None = None) -> None:
    """Set the scheduled rate on every group (scaled by the group's ``lr_scale``) and,
    given, Muon's momentum. Both are functions of the step, so a resumed run sets the
    same values an uninterrupted one does."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if momentum is not None and group.get("muon"):
            group["momentum"] = momentum


class Chained:
    """Several optimizers stepped as one: the Trainer, resume and DDP see one object."""

    def __init__(self, **optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def register_step_pre_hook(self, hook):
        """Called before the chain steps (the first optimizer steps first), as torch's is."""
        return next(iter(self.optimizers.values())).register_step_pre_hook(hook)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def _adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    # fused AdamW runs on CPU and CUDA; elsewhere (mps on older torch) use the default loop.
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW with weight decay on matrices (incl. embeddings) only, not on biases or norms;
    or, for ``optimizer: muon``, Muon on the blocks' matrices chained with that AdamW.

    AdamW's groups, each at its ``lr_scale`` x the scheduled rate: the blocks' matrices
    (``adamw`` only; 1), the embedding tables, the tied head among them (``embed_lr_scale``),
    and the vectors: norm gains and biases (``scalar_lr_scale``, no decay)."""
    device_type = next(model.parameters()).device.type
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if p.dim() == 2 and ".h." in f".{n}"] if cfg.optimizer == "muon" else []
    taken = {id(p) for p in hidden}
    embed = [p for n, p in named if n.startswith(("transformer.wte.", "transformer.wpe."))]
    taken |= {id(p) for p in embed}
    matrices = [p for _, p in named if p.dim() >= 2 and id(p) not in taken]
    vectors = [p for _, p in named if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": embed, "weight_decay": cfg.weight_decay, "lr_scale": cfg.embed_lr_scale},
              {"params": vectors, "weight_decay": 0.0, "lr_scale": cfg.scalar_lr_scale}]
    adamw = _adamw([g for g in groups if g["params"]], cfg, device_type)
    if not hidden:
        return adamw
    muon = torch.optim.Muon([{"params": hidden, "lr_scale": cfg.muon_lr_scale, "muon": True}],
                            lr=cfg.learning_rate * cfg.muon_lr_scale, weight_decay=cfg.weight_decay,
                            momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw")
    return Chained(adamw=adamw, muon=muon)
