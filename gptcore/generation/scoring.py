"""Log-probabilities, as scoring tools read them through the completions API (``echo`` and
``logprobs``): the model's own distribution, before any temperature, penalty or top-k/top-p
filter, as OpenAI's are.

A text's tokens are scored the way the evaluate stage scores the val split: each window of
``block_size`` input tokens predicts the next ``block_size`` tokens. A text longer than that
slides its window by half a context, and each token is scored once, by the first window that
predicts it, so every token after the first ``block_size`` sees at least ``block_size // 2``
tokens of context. A text of up to ``block_size + 1`` tokens is one window: its numbers are
exactly the evaluate stage's for the same tokens.
"""

from __future__ import annotations

import torch

# One token's entry: (its log-probability, [(alternative id, log-probability), ...] the
# top-n, most probable first).
Scored = tuple[float, list[tuple[int, float]]]


def top_alternatives(logprobs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """The ``n`` most probable ids of each row of ``logprobs`` (rows, vocab)."""
    if n == 0:
        return [[] for _ in range(logprobs.size(0))]
    values, ids = logprobs.topk(n, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


@torch.no_grad()
def score_tokens(model, ids: list[int], top_n: int = 0) -> list[Scored | None]:
    """log p(ids[i] | ids[:i]) for every i (None for the first token, which nothing predicts),
    each with the ``top_n`` most probable alternatives at that position."""
    block = model.config.block_size
    device = next(model.parameters()).device
    out: list[Scored | None] = [None] * len(ids)
    done, start = 1, 0  # tokens [0, done) are scored; the window's first input token
    while done < len(ids):
        window = ids[start:start + block + 1]  # inputs window[:-1] predict window[1:]
        logits, _ = model(torch.tensor([window[:-1]], device=device))
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        first = done - start - 1  # the first input position whose target is not scored yet
        targets = torch.tensor(window[first + 1:], device=device)
        rows = logprobs[first:first + len(targets)]
        chosen = rows.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        for k, (lp, alts) in enumerate(zip(chosen, top_alternatives(rows, top_n))):
            out[done + k] = (lp, alts)
        done += len(targets)
        start += max(1, block // 2)
    return out
