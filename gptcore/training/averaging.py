"""Weight averaging: an exponential moving average (EMA) of the parameters, kept beside
the trained weights, that validation measures and the best checkpoint publishes.

Why: this model overfits Tiny Shakespeare (docs/results.md), and the last steps' weights are a
noisy draw around where the optimizer is heading; their average usually sits lower in the
validation loss than any one of them. Training itself never sees the average: the
optimizer steps the raw weights, and the average is swapped in only to evaluate and save.

The decay warms up (``train.ema_warmup``), so the early average is not dominated by the
random initial weights: after ``n`` updates it is ``min(decay, w(n))`` with

- ``mean``: ``w(n) = n / (1 + n)``, the plain running mean of the weights so far until
  the cap binds (at ``n = decay / (1 - decay)``: update 199 for 0.995). The average
  then spans the whole cap from there on.
- ``tf``: ``w(n) = (1 + n) / (10 + n)`` (TensorFlow's ``ExponentialMovingAverage`` with
  ``num_updates``), which trails the mean: a 0.995 cap binds only at update 1,790, so a
  1,000-step run never averages over more than ~110 steps whatever the cap.

On the default recipe the running mean with a 0.995 cap beat ``tf`` with 0.99 on each of
3 seeds, paired on the same trajectories (docs/results.md, "Which average?").

The average and its update count travel in the resume state, so a resumed run averages
exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib

import torch

WARMUPS = ("mean", "tf")


def warmed_decay(decay: float, warmup: str, n: int) -> float:
    """The decay of update ``n`` (counted from 1): the warm-up ``warmup``, capped at ``decay``."""
    if warmup == "mean":
        return min(decay, n / (1 + n))
    if warmup == "tf":
        return min(decay, (1 + n) / (10 + n))
    raise ValueError(f"ema warm-up {warmup!r}: allowed: {', '.join(WARMUPS)}")


class WeightAverage:
    """EMA of ``model``'s parameters, in their dtype (float32: autocast leaves the weights
    float32) and on their device."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: str = "mean") -> None:
        # parameters() yields a tied weight once: the embedding and head share one average.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.decay = decay
        warmed_decay(decay, warmup, 1)  # refuses an unknown warm-up here, not at the first step
        self.warmup = warmup
        self.updates = 0
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: average += (1 - decay) * (weights - average)."""
        self.updates += 1
        decay = warmed_decay(self.decay, self.warmup, self.updates)
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """The model holds the averaged weights inside the block, its own ones after
        (copied back exactly, so training continues bit for bit)."""
        trained = [p.detach().clone() for p in self.params]
        torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            torch._foreach_copy_(self.params, trained)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "average": [a.detach().cpu() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(t.shape) for t in state["average"]]
        if shapes != [tuple(a.shape) for a in self.average]:
            raise ValueError(f"weight average holds {len(shapes)} tensors of other shapes than the "
                             f"model's {len(self.average)}")
        self.updates = state["updates"]
        for mine, saved in zip(self.average, state["average"]):
            mine.copy_(saved)
