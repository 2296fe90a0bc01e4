"""From next-token logits to tokens: repetition penalty -> temperature -> top-k -> top-p,
then one draw per row from its own generator (argmax when the temperature is 0).

The filters work on a row's *candidates*, not on the whole vocabulary: top-k keeps the k
largest logits, top-p then keeps the most probable of those, and the draw
inverts the cumulative distribution over the survivors with one uniform number from the
row's generator. With top-k on, everything after the top-k selection costs O(k) per row
instead of O(vocab): on a CPU, sorting and drawing over all of GPT-2's 50,257 ids for
each row and token cost more than the decoding step itself, so rows sharing a step would
not have been cheap. Without top-k the candidates are the whole vocabulary.

A decoder asked for a row's ``top`` largest logits (greedy, or top-k without a repetition
penalty) hands over just those, exact and in order (:class:`TopLogits`): it selects them
more cheaply than ``torch.topk`` over the whole vocabulary, and with a screened head
never computes the rest. Greedy takes the first (the lowest id of a tie), top-k the first k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..model.decode import TopLogits
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


def candidates(logits: torch.Tensor | TopLogits, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids each row may draw and their tempered scores: ``(scores, ids)``, both
    (rows, n), -inf for an id a filter dropped. ``logits`` is (rows, vocab), after any
    repetition penalty, or each row's top ``cfg.top_k`` (:class:`TopLogits`, no penalty);
    ``cfg.temperature`` > 0.

    top-k keeps exactly ``k`` ids (at a tie on the k-th value, the lowest ids from a
    :class:`TopLogits`; ``torch.topk`` chooses from dense logits). top-p keeps the
    smallest set of the most probable candidates whose total probability reaches ``p``
    (the most probable is always kept; equal probabilities in id order)."""
    if isinstance(logits, TopLogits):  # a decoder's top, sorted, largest first
        scores, ids = logits.values[:, :cfg.top_k], logits.ids[:, :cfg.top_k]
    elif 0 < cfg.top_k < logits.size(-1):
        scores, ids = logits.topk(cfg.top_k, dim=-1)  # sorted, largest first
    elif cfg.top_p < 1.0:
        scores, ids = logits.sort(dim=-1, descending=True, stable=True)
    else:
        scores, ids = logits, torch.arange(logits.size(-1), device=logits.device).expand_as(logits)
    scores = scores.float() / cfg.temperature
    if cfg.top_p < 1.0:
        probs = F.softmax(scores, dim=-1)
        # A candidate is needed while the ones before it have not reached p yet.
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        drop[..., 0] = False
        scores = scores.masked_fill(drop, float("-inf"))
    return scores, ids


def draw(logits: torch.Tensor | TopLogits, cfg: SamplingConfig, generators: Sequence[torch.Generator | None],
         seen: Sequence[Sequence[int]] | None = None) -> list[int]:
    """One token per row of ``logits`` (rows, vocab) or of each row's top
    (:class:`TopLogits`), all rows with the settings ``cfg``; row ``i`` draws from
    ``generators[i]`` and its penalty counts ``seen[i]``."""
    if isinstance(logits, TopLogits):
        assert seen is None or cfg.repetition_penalty == 1.0, "a penalty re-ranks every logit: pass them all"
        if cfg.greedy:
            return logits.ids[:, 0].tolist()
        scores, ids = candidates(logits, cfg)
        return _inverse_cdf(scores, ids, generators)
    logits = logits.float()
    if seen is not None and cfg.repetition_penalty != 1.0:
        logits = torch.stack([apply_repetition_penalty(row, ids, cfg.repetition_penalty)
                              for row, ids in zip(logits, seen)])
    if cfg.greedy:
        return logits.argmax(-1).tolist()  # first maximum: lowest id on ties
    scores, ids = candidates(logits, cfg)
    return _inverse_cdf(scores, ids, generators)


def _inverse_cdf(scores: torch.Tensor, ids: torch.Tensor, generators: Sequence[torch.Generator | None]) -> list[int]:
    """Each row's draw from softmax(scores): one uniform number from its generator."""
    cdf = F.softmax(scores, dim=-1).cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=scores.device) for g in generators])
    # The first candidate whose cumulative probability exceeds u; dropped candidates add
    # nothing to the sum, so they are never it.
    at = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=cdf.size(1) - 1)
    return ids.gather(1, at).squeeze(1).tolist()
