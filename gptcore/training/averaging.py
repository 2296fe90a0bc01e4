"""Weight averaging: an exponential moving average (EMA) of the parameters, kept beside
the trained weights, that validation measures and the best checkpoint publishes.

Why: this model overfits Tiny Shakespeare (issue #21), and the last steps' weights are a
noisy draw around where the optimizer is heading; their average usually sits lower in the
validation loss than any one of them. Training itself never sees the average: the
optimizer steps the raw weights, and the average is swapped in only to evaluate and save.

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
early average is not dominated by the random initial weights. The average and its update
count travel in the resume state, so a resumed run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib

import torch


class WeightAverage:
    """EMA of ``model``'s parameters, in their dtype (float32: autocast leaves the weights
    float32) and on their device."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        # parameters() yields a tied weight once: the embedding and head share one average.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.decay = decay
        self.updates = 0
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: average += (1 - decay) * (weights - average)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
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
