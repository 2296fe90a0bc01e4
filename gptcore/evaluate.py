"""Exact evaluation over a whole split: every token predicted exactly once.

The split is prefixed with the end-of-text token (as GPT-2 conditions a document's
first token) and cut into consecutive, non-overlapping windows of ``block_size``.
Each window predicts its next ``block_size`` tokens, so the first val token is
predicted too and no token is counted twice. Tokens early in a window see less
context than a sliding window would give them; the number is conservative and
identical across runs.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from tqdm import tqdm

from .model import GPT
from .training.device import autocast


def windows(tokens, block_size: int, eot_id: int, batch_size: int):
    """The evaluation's batches ``(x, y)``, each (rows, block_size): over [eot] + tokens,
    consecutive non-overlapping windows; ``y`` is -1 past the split's end. Every token of
    ``tokens`` is a target exactly once, in order."""
    T, n = block_size, len(tokens)
    starts = list(range(0, n, T))
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        x = torch.full((len(group), T), eot_id, dtype=torch.long)
        y = torch.full((len(group), T), -1, dtype=torch.long)  # -1: padding, ignored
        for row, s in enumerate(group):
            # Over seq = [eot] + tokens: x = seq[s:s+length], y = seq[s+1:s+1+length],
            # read from the (memory-mapped) split one window at a time, never whole.
            length = min(T, n - s)
            y[row, :length] = torch.from_numpy(np.asarray(tokens[s:s + length], dtype=np.int64))
            x[row, 1:length] = y[row, :length - 1]
            x[row, 0] = eot_id if s == 0 else int(tokens[s - 1])
        yield x, y


@torch.no_grad()
def evaluate_tokens(model: GPT, tokens, eot_id: int, n_bytes: int,
                    batch_size: int = 8, dtype: str = "float32",
                    device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """``val_loss`` (mean nats/token), ``perplexity`` and ``bits_per_byte`` of ``tokens``."""
    device = torch.device(device)
    model.eval()
    tokens = tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens  # or a memory map
    n = len(tokens)
    total_nats = 0.0
    counted = 0
    with tqdm(total=n, desc="evaluate", unit="tok", file=sys.stderr,
              disable=not progress or None, unit_scale=True) as bar:
        for x, y in windows(tokens, model.config.block_size, eot_id, batch_size):
            with autocast(device, dtype):
                nats = model.loss(x.to(device), y.to(device), reduction="sum")
            total_nats += nats.item()
            done = int((y != -1).sum())
            counted += done
            bar.update(done)
    assert counted == n, (counted, n)  # every token exactly once
    loss = total_nats / n
    return {"val_loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total_nats / math.log(2) / n_bytes,
            "val_tokens": n, "val_bytes": n_bytes}
