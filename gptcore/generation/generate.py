"""Text generation: sampling strategies, a KV-cached decoding loop, streamed text.

Layers, bottom up:

* :class:`SamplingConfig` -- validated settings (errors name the field, the value and
  what is allowed).
* :func:`process_logits` -- repetition penalty -> temperature -> top-k -> top-p, and
  :func:`sample_token`, which draws from the result (argmax when temperature is 0).
* :func:`stream_ids` / :func:`generate_ids` -- the decoding loop over token ids.
* :func:`stream` / :func:`generate` -- text in, text out: UTF-8 safe streaming and
  stop strings.
* :func:`stream_ids_batch` / :func:`generate_ids_batch` / :func:`stream_batch` /
  :func:`generate_batch` -- N completions of one prompt decoded side by side as one
  batch (see "Batches" below).

Decoding loop
-------------
The prompt is run once ("prefill") to fill the KV cache, then every step feeds the one
new token at the next position. Positions are learned embeddings, so a cached key is
only valid at the position it was computed for. When the sequence would outgrow
``block_size``, the context is cropped to its most recent ``crop_to`` tokens (default
``block_size // 2``, so the cost of the rebuild is paid once every ``block_size // 2``
tokens instead of every token) and the cache is rebuilt by prefilling that window from
position 0. ``crop_to=block_size`` gives an exact sliding window (a full prefill every
step once the context is full). ``use_cache=False`` runs the same schedule with a full
forward pass over the current window every step: the reference the cache is tested
against.

Prompts: an empty prompt starts from the end-of-text token, as GPT-2 does for
unconditional samples (that token is context only, never output). A prompt longer than
``block_size`` tokens is cut to its last ``block_size`` tokens (the CLI warns).

Batches
-------
``num_samples`` completions of one prompt run as one (rows, T) batch through the same
decoder: the prompt is prefilled once and its KV cache copied into every row, then each
step feeds one token per row. A step streams the weights once for all rows, so on a
CPU N rows cost far less than N single decodes. All rows sit at the same position, so
the crop/re-prefill above happens for the whole batch at once (each row keeps its own
most recent ``crop_to`` tokens). Each row ends on its own -- end-of-text, a stop string,
``max_new_tokens`` -- and leaves the batch; the batch ends when no row is left.

Sampling is per row: the repetition penalty counts each row's own tokens, top-k/top-p
filter each row's logits, and row ``i`` draws from its own ``torch.Generator`` seeded
``cfg.seed + i`` (fresh random seeds when ``cfg.seed`` is None). A row consumes its
generator exactly as a single decode does, so row ``i`` of a batch is the completion a
single decode with seed ``cfg.seed + i`` produces (up to float rounding: a batched matrix
product may round differently from a single row's, which can flip a draw or an argmax
only at a near-tie); ``num_samples=1`` runs the single-sequence arithmetic exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..model.decode import CachedDecoder, UncachedDecoder
from ..model.gpt import GPT
from .logits import apply_repetition_penalty, apply_top_k, apply_top_p, process_logits, sample_token
from .sampling import SamplingConfig
from .text import TextPieces, decode_stream

__all__ = [
    "SamplingConfig", "process_logits", "sample_token", "apply_repetition_penalty",
    "apply_top_k", "apply_top_p", "stream_ids", "generate_ids", "decode_stream", "stream", "generate",
    "stream_ids_batch", "generate_ids_batch", "stream_batch", "generate_batch",
]


# --------------------------------------------------------------------------- decoding loop


def _model_device(model: GPT, device) -> torch.device:
    actual = next(model.parameters()).device
    if device is not None:
        wanted = torch.device(device)
        if wanted.type != actual.type or (wanted.index is not None and wanted.index != actual.index):
            raise ValueError(f"device={device!s} but the model is on {actual}; move the model first")
    return actual


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _prepare(model: GPT, prompt_ids, eot_id, device, crop_to, vocab_size, max_new_tokens):
    """Validate a decode's arguments -> (context ids, ids the penalty counts, crop length,
    device, how many ids may be produced)."""
    block = model.config.block_size
    vocab = model.config.vocab_size
    keep = max(1, block // 2) if crop_to is None else crop_to
    if not (isinstance(keep, int) and not isinstance(keep, bool) and 1 <= keep <= block):
        raise ValueError(f"crop_to={crop_to!r} is invalid; allowed: 1 <= crop_to <= block_size={block}")
    dev = _model_device(model, device)
    ids = [int(i) for i in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"prompt token id(s) {bad[:5]} outside the model's vocabulary [0, {vocab})")
    seen = list(ids)  # what the repetition penalty counts: prompt + generated
    if not ids and max_new_tokens:  # nothing to generate needs no context
        if eot_id is None or not 0 <= eot_id < vocab:
            raise ValueError(f"an empty prompt starts from the end-of-text token, but eot_id={eot_id!r} "
                             f"is not in the model's vocabulary [0, {vocab})")
        ids = [eot_id]
    limit = vocab if vocab_size is None else min(vocab, vocab_size)
    return ids, seen, keep, dev, limit


def _top(cfg: SamplingConfig) -> int | None:
    """How many of the largest logits can decide the next token (None: all of them).
    The repetition penalty re-ranks logits, so it needs them all."""
    return None if cfg.repetition_penalty != 1.0 else 1 if cfg.greedy else cfg.top_k or None


def stream_ids(model: GPT, prompt_ids: Sequence[int], cfg: SamplingConfig | None = None, *,
               eot_id: int | None = None, device=None, use_cache: bool = True,
               crop_to: int | None = None, vocab_size: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (see the module docstring for the context policy).

    ``eot_id``: the end-of-text token; generation stops before it when
    ``cfg.stop_at_eot``, and an empty prompt starts from it. ``vocab_size``: only ids
    below it are ever produced (a model's vocabulary may be padded beyond its
    tokenizer's, and those ids decode to nothing). ``crop_to``: how many of
    the most recent tokens to keep when the context is full (1..block_size; default
    block_size // 2). Use the model in eval mode (``load_checkpoint`` returns it so).
    """
    cfg = cfg or SamplingConfig()
    block = model.config.block_size
    ids, seen, keep, dev, limit = _prepare(model, prompt_ids, eot_id, device, crop_to, vocab_size,
                                             cfg.max_new_tokens)
    if cfg.max_new_tokens == 0:
        return
    penalize = cfg.repetition_penalty != 1.0
    generator = None if cfg.greedy else _make_generator(cfg.seed, dev)
    runner = (CachedDecoder(model, top=_top(cfg), vocab_limit=limit) if use_cache
              else UncachedDecoder(model, vocab_limit=limit))
    start = max(0, len(ids) - block)  # the window is ids[start:]
    logits = runner.prefill(ids[start:])
    for n in range(cfg.max_new_tokens):
        if cfg.greedy and not penalize:
            token = int(logits.max(-1).indices)
        else:
            token = int(sample_token(logits, cfg, generator, seen if penalize else None))
        if cfg.stop_at_eot and token == eot_id:
            return
        yield token
        if n + 1 == cfg.max_new_tokens:
            return  # no forward pass for a token nobody will read
        ids.append(token)
        if penalize:
            seen.append(token)
        if len(ids) - start > block:  # no room: crop the window, rebuild the cache from 0
            start = len(ids) - keep
            logits = runner.prefill(ids[start:])
        else:
            logits = runner.step(token)


def generate_ids(model: GPT, prompt_ids: Sequence[int], cfg: SamplingConfig | None = None,
                 **kwargs) -> list[int]:
    """All the ids :func:`stream_ids` yields, as a list."""
    return list(stream_ids(model, prompt_ids, cfg, **kwargs))


def _check_num_samples(num_samples) -> None:
    if not (isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1):
        raise ValueError(f"num_samples={num_samples!r} is invalid; allowed: an integer >= 1")


def stream_ids_batch(model: GPT, prompt_ids: Sequence[int], num_samples: int, cfg: SamplingConfig | None = None,
                     *, eot_id: int | None = None, device=None, use_cache: bool = True, crop_to: int | None = None,
                     vocab_size: int | None = None, stopped: set[int] | None = None
                     ) -> Iterator[dict[int, int | None]]:
    """Decode ``num_samples`` completions of ``prompt_ids`` as one batch (see "Batches" in
    the module docstring); the other arguments mean what they mean for :func:`stream_ids`.

    Yields, once per step, ``{sample index: new token id}`` for every row still running;
    ``None`` instead of an id means the row drew end-of-text (with ``cfg.stop_at_eot``)
    and ends there. Rows end after ``max_new_tokens`` ids. The caller ends a row early by
    adding its index to ``stopped`` (the text layer does, on a stop string): the row
    leaves the batch before the next forward pass and is never yielded again.
    """
    cfg = cfg or SamplingConfig()
    _check_num_samples(num_samples)
    block = model.config.block_size
    ids, seen, keep, dev, limit = _prepare(model, prompt_ids, eot_id, device, crop_to, vocab_size,
                                             cfg.max_new_tokens)
    if cfg.max_new_tokens == 0:
        return
    stopped = set() if stopped is None else stopped
    penalize = cfg.repetition_penalty != 1.0
    fast_greedy = cfg.greedy and not penalize
    # Row i's own generator, seeded as a single decode with seed + i would be.
    generators = None if cfg.greedy else [
        _make_generator(None if cfg.seed is None else cfg.seed + i, dev) for i in range(num_samples)]
    runner = (CachedDecoder(model, top=_top(cfg), vocab_limit=limit, batch_size=num_samples) if use_cache
              else UncachedDecoder(model, vocab_limit=limit, batch_size=num_samples))
    rows = list(range(num_samples))  # batch position -> sample index
    window = torch.tensor([ids[max(0, len(ids) - block):]], dtype=torch.long, device=dev)
    logits = runner.prefill_rows(window)  # the shared prompt runs once
    window = window.expand(num_samples, -1)
    # (rows, n): every running row has seen the prompt plus one token per step, so the
    # penalty's ids are one rectangular tensor.
    history = torch.tensor([seen], dtype=torch.long, device=dev).expand(num_samples, -1)
    for n in range(cfg.max_new_tokens):
        if fast_greedy:
            tokens = logits.max(-1).indices
        else:
            scores = process_logits(logits, cfg, history if penalize and history.size(1) else None)
            if cfg.greedy:
                tokens = scores.max(-1).indices
            else:
                probs = F.softmax(scores, dim=-1)
                # One draw per row from the row's own generator, as sample_token draws for one.
                tokens = torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=generators[b])[0]
                                    for b in range(len(rows))])
        picked = tokens.tolist()
        ended = [cfg.stop_at_eot and t == eot_id for t in picked]
        yield {row: None if end else t for row, t, end in zip(rows, picked, ended)}
        if n + 1 == cfg.max_new_tokens:
            return  # no forward pass for tokens nobody will read
        alive = [b for b, row in enumerate(rows) if not ended[b] and row not in stopped]
        if not alive:
            return
        if len(alive) < len(rows):  # finished rows leave the batch
            runner.keep_rows(alive)
            rows = [rows[b] for b in alive]
            generators = generators and [generators[b] for b in alive]
            index = torch.tensor(alive, dtype=torch.long, device=dev)
            tokens, window, history = tokens[index], window[index], history[index]
        window = torch.cat([window, tokens.view(-1, 1)], dim=1)
        if penalize:
            history = torch.cat([history, tokens.view(-1, 1)], dim=1)
        if window.size(1) > block:  # no room: crop every row's window, rebuild the cache from 0
            window = window[:, -keep:]
            logits = runner.prefill_rows(window)
        else:
            logits = runner.step_rows(tokens)


def generate_ids_batch(model: GPT, prompt_ids: Sequence[int], num_samples: int,
                       cfg: SamplingConfig | None = None, **kwargs) -> list[list[int]]:
    """The ids of each of ``num_samples`` completions (:func:`stream_ids_batch`), as lists."""
    _check_num_samples(num_samples)
    out: list[list[int]] = [[] for _ in range(num_samples)]
    for step in stream_ids_batch(model, prompt_ids, num_samples, cfg, **kwargs):
        for row, token in step.items():
            if token is not None:
                out[row].append(token)
    return out


# --------------------------------------------------------------------------- text


def stream(model: GPT, tokenizer, prompt: str | Sequence[int] = "", cfg: SamplingConfig | None = None,
           *, device=None, use_cache: bool = True, crop_to: int | None = None) -> Iterator[str]:
    """Yield the completion of ``prompt`` (text, or token ids) as text pieces.

    Tokens come from :func:`stream_ids` (the end-of-text token ends generation when
    ``cfg.stop_at_eot``; otherwise it is decoded like any token) and are turned into
    text by :func:`decode_stream` (UTF-8 safe, stops at the first of ``cfg.stop``).
    """
    cfg = cfg or SamplingConfig()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    tokens = stream_ids(model, ids, cfg, eot_id=tokenizer.eot_id, device=device,
                        use_cache=use_cache, crop_to=crop_to, vocab_size=tokenizer.vocab_size)
    yield from decode_stream(tokenizer, tokens, cfg.stop)


def generate(model: GPT, tokenizer, prompt: str | Sequence[int] = "", cfg: SamplingConfig | None = None,
             **kwargs) -> str:
    """The completion of ``prompt`` as one string (the prompt itself not included)."""
    return "".join(stream(model, tokenizer, prompt, cfg, **kwargs))


# Rows decoded side by side at most: past this, more rows gain little per step on a CPU
# and each costs a KV cache (~1 MiB for the default model) and several vocab-sized rows.
MAX_BATCH_ROWS = 32


def stream_batch(model: GPT, tokenizer, prompt: str | Sequence[int] = "", num_samples: int = 1,
                 cfg: SamplingConfig | None = None, *, device=None, use_cache: bool = True,
                 crop_to: int | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(i, completion)`` for each of ``num_samples`` completions of ``prompt``,
    each as soon as it is complete (in the order the rows finish; rows finishing at the
    same step in index order). Decoded as one batch (:func:`stream_ids_batch`); each row
    stops at end-of-text, its first ``cfg.stop`` string or ``max_new_tokens``, as
    :func:`stream` does, and sample ``i`` samples with seed ``cfg.seed + i``.
    """
    cfg = cfg or SamplingConfig()
    _check_num_samples(num_samples)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    if num_samples > MAX_BATCH_ROWS:
        # Batches of at most MAX_BATCH_ROWS rows: memory (a KV cache and vocab-sized logits
        # per row) stays bounded whatever N is; sample i keeps seed + i.
        for first in range(0, num_samples, MAX_BATCH_ROWS):
            part = cfg if cfg.seed is None else dataclasses.replace(cfg, seed=cfg.seed + first)
            for i, text in stream_batch(model, tokenizer, ids, min(MAX_BATCH_ROWS, num_samples - first), part,
                                        device=device, use_cache=use_cache, crop_to=crop_to):
                yield first + i, text
        return
    texts = [TextPieces(tokenizer, cfg.stop) for _ in range(num_samples)]
    parts: list[list[str]] = [[] for _ in range(num_samples)]
    running = set(range(num_samples))
    stopped: set[int] = set()
    steps = stream_ids_batch(model, ids, num_samples, cfg, eot_id=tokenizer.eot_id, device=device,
                             use_cache=use_cache, crop_to=crop_to, vocab_size=tokenizer.vocab_size,
                             stopped=stopped)
    for step in steps:
        for row, token in sorted(step.items()):
            if token is not None:
                parts[row].append(texts[row].push(token))
                if not texts[row].stopped:
                    continue
                stopped.add(row)  # leaves the batch before the next step
            running.discard(row)
            parts[row].append(texts[row].finish())
            yield row, "".join(parts[row])
    for row in sorted(running):  # ended together at max_new_tokens (or never started)
        parts[row].append(texts[row].finish())
        yield row, "".join(parts[row])


def generate_batch(model: GPT, tokenizer, prompt: str | Sequence[int] = "", num_samples: int = 1,
                   cfg: SamplingConfig | None = None, **kwargs) -> list[str]:
    """The ``num_samples`` completions of ``prompt`` (:func:`stream_batch`), in sample order."""
    out = dict(stream_batch(model, tokenizer, prompt, num_samples, cfg, **kwargs))
    return [out[i] for i in range(num_samples)]
