"""From a model's next-token logits to a token: repetition penalty -> temperature ->
top-k -> top-p (:func:`process_logits`), then a draw (:func:`sample_token`; argmax when
the temperature is 0). Rows of a batch are filtered each on its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import SamplingConfig


def apply_repetition_penalty(logits: torch.Tensor, seen_ids, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for every id in ``seen_ids``, divide a positive logit by
    ``penalty`` and multiply a negative one by it (both lower it when penalty > 1).

    ``logits`` is (..., vocab); ``seen_ids`` (..., n) or a list of ids shared by all
    rows. Repeated ids count once. Returns a new tensor.
    """
    if penalty == 1.0 or seen_ids is None or len(seen_ids) == 0:
        return logits
    seen = torch.as_tensor(seen_ids, dtype=torch.long, device=logits.device)
    if seen.dim() < logits.dim():
        seen = seen.expand(*logits.shape[:-1], seen.size(-1))
    score = logits.gather(-1, seen)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(-1, seen, score)  # duplicates write the same value


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly ``k`` logits per row (the rest become -inf); 0 = keep all.

    Ties at the boundary are broken deterministically: among tokens whose logit equals
    the k-th largest, the lowest token ids are kept, so exactly ``k`` survive.
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    above = logits > kth
    tied = logits == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the tied ones still fit
    keep = above | (tied & (tied.cumsum(-1) <= room))
    return logits.masked_fill(~keep, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens, most probable first, whose total
    probability reaches ``p`` (the rest become -inf); 1 = keep all.

    Equal probabilities are ordered by token id (stable sort), lowest first. The most
    probable token is always kept.
    """
    if p >= 1.0:
        return logits
    probs = F.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    # A token is needed while the tokens before it have not reached p yet.
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, seen_ids=None) -> torch.Tensor:
    """Repetition penalty, temperature, top-k, top-p -- in that order -- as float32.

    With temperature 0 only the penalty is applied (greedy takes the argmax, which
    every filter would keep anyway).
    """
    logits = apply_repetition_penalty(logits.float(), seen_ids, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    logits = apply_top_k(logits, cfg.top_k)
    return apply_top_p(logits, cfg.top_p)


def sample_token(logits: torch.Tensor, cfg: SamplingConfig,
                 generator: torch.Generator | None = None, seen_ids=None) -> torch.Tensor:
    """Next token id(s) (..., ) from raw logits (..., vocab)."""
    logits = process_logits(logits, cfg, seen_ids)
    if cfg.greedy:
        return logits.max(-1).indices  # first maximum: lowest id on ties
    probs = F.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.size(-1))
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
