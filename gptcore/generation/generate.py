"""Text in, text out: completions of prompts, decoded by the engine (``engine.py``) and
turned into text by the text layer (``text.py``: UTF-8 safe streaming, stop strings).

Public, and why each is kept:

* :func:`stream` -- one completion as text pieces, as they are decoded (``gptcore
  generate`` prints them as they come).
* :func:`generate` -- one completion as a string (the sample stage, the Python API).
* :func:`stream_batch` / :func:`generate_batch` -- ``num_samples`` completions of one
  prompt decoded side by side (``gptcore generate --num-samples``); sample ``i`` uses seed
  ``cfg.seed + i``, so it is what a lone decode with that seed gives.
* :func:`generate_ids` -- token ids in, ids out (benchmarks, and parity checks against
  other implementations, which compare ids).

Servers and anything with its own scheduling use :class:`~.engine.Engine` directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..errors import invalid
from ..model.gpt import GPT
from .engine import Engine
from .sampling import SamplingConfig, _is_int
from .text import TextPieces

__all__ = ["SamplingConfig", "stream", "generate", "stream_batch", "generate_batch", "generate_ids",
           "MAX_BATCH_ROWS"]

# Rows decoded side by side at most by stream_batch: past this, more rows gain little per
# step on a CPU and each costs a KV cache (~1 MiB for the default model) and several
# vocab-sized rows of logits.
MAX_BATCH_ROWS = 32


def _engine(model: GPT, tokenizer, rows: int, device, use_cache: bool, crop_to) -> Engine:
    return Engine(model, max_rows=rows, eot_id=tokenizer.eot_id, vocab_size=tokenizer.vocab_size,
                  crop_to=crop_to, use_cache=use_cache, device=device)


def generate_ids(model: GPT, prompt_ids: Sequence[int], cfg: SamplingConfig | None = None, *,
                 eot_id: int | None = None, vocab_size: int | None = None, device=None,
                 use_cache: bool = True, crop_to: int | None = None) -> list[int]:
    """The new token ids of one completion of ``prompt_ids`` (end-of-text not included)."""
    engine = Engine(model, eot_id=eot_id, vocab_size=vocab_size, crop_to=crop_to, use_cache=use_cache,
                    device=device)
    engine.submit(prompt_ids, cfg)
    return [token for _, token in engine.run() if token is not None]


def stream(model: GPT, tokenizer, prompt: str | Sequence[int] = "", cfg: SamplingConfig | None = None,
           *, device=None, use_cache: bool = True, crop_to: int | None = None) -> Iterator[str]:
    """Yield the completion of ``prompt`` (text, or token ids) as text pieces.

    Generation ends at end-of-text (when ``cfg.stop_at_eot``; otherwise that token is
    decoded like any other), at ``cfg.max_new_tokens``, or at the first of ``cfg.stop``
    (the text before it is the last piece).
    """
    cfg = cfg or SamplingConfig()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    engine = _engine(model, tokenizer, 1, device, use_cache, crop_to)
    row = engine.submit(ids, cfg)
    text = TextPieces(tokenizer, cfg.stop)
    while engine.busy:
        for _, token in engine.step():
            if token is None:
                continue
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                row.cancel()
                return
    tail = text.finish()
    if tail:
        yield tail


def generate(model: GPT, tokenizer, prompt: str | Sequence[int] = "", cfg: SamplingConfig | None = None,
             **kwargs) -> str:
    """The completion of ``prompt`` as one string (the prompt itself not included)."""
    return "".join(stream(model, tokenizer, prompt, cfg, **kwargs))


def _check_num_samples(num_samples) -> None:
    if not (_is_int(num_samples) and num_samples >= 1):
        raise ValueError(invalid("num_samples", num_samples, "an integer >= 1"))


def stream_batch(model: GPT, tokenizer, prompt: str | Sequence[int] = "", num_samples: int = 1,
                 cfg: SamplingConfig | None = None, *, device=None, use_cache: bool = True,
                 crop_to: int | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(i, completion)`` for each of ``num_samples`` completions of ``prompt``,
    each as soon as it is complete (in the order they finish; those finishing at the same
    step in index order). At most :data:`MAX_BATCH_ROWS` decode side by side; the rest
    wait for a free row. Each stops as :func:`stream` does; sample ``i`` samples with
    seed ``cfg.seed + i``.
    """
    cfg = cfg or SamplingConfig()
    _check_num_samples(num_samples)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    engine = _engine(model, tokenizer, min(num_samples, MAX_BATCH_ROWS), device, use_cache, crop_to)
    texts, parts = [], []
    for i in range(num_samples):
        engine.submit(ids, cfg.for_sample(i), tag=i)
        texts.append(TextPieces(tokenizer, cfg.stop))
        parts.append([])
    if cfg.max_new_tokens == 0:
        yield from ((i, "") for i in range(num_samples))
        return
    while engine.busy:
        for row, token in sorted(engine.step(), key=lambda e: e[0].tag):
            i = row.tag
            if token is not None:
                parts[i].append(texts[i].push(token))
                if texts[i].stopped:
                    row.cancel()
            if row.finished:
                parts[i].append(texts[i].finish())
                yield i, "".join(parts[i])


def generate_batch(model: GPT, tokenizer, prompt: str | Sequence[int] = "", num_samples: int = 1,
                   cfg: SamplingConfig | None = None, **kwargs) -> list[str]:
    """The ``num_samples`` completions of ``prompt`` (:func:`stream_batch`), in sample order."""
    out = dict(stream_batch(model, tokenizer, prompt, num_samples, cfg, **kwargs))
    return [out[i] for i in range(num_samples)]
