"""The decoding engine: every way gptcore generates runs through it.

An :class:`Engine` holds a set of active rows. Each row (:class:`Row`) is one completion
with its own prompt, position, sampling settings, generator and token budget. Each
:meth:`Engine.step` runs one forward pass for all active rows, then picks one token per
row. Rows wait in a queue until a slot is free (at most ``max_rows`` decode side by
side), are admitted between steps and leave as soon as they finish: continuous batching.
One sample, ``--num-samples N``, the sample stage and the HTTP server are all rows.

Context policy
--------------
A row's prompt is run once ("prefill") to fill its KV cache, then every step feeds the
one new token at the row's next position. Positions are absolute (learned embeddings, or
rotary angles of the absolute position), so a cached key is only valid at the position it
was computed for, and a window past ``block_size`` was never trained. When a row would outgrow
``block_size``, its context is cropped to its most recent ``crop_to`` tokens (default
``block_size // 2``, so the rebuild is paid once every ``block_size // 2`` tokens) and its
cache is rebuilt by prefilling that window from position 0; the other rows are not
touched. ``crop_to=block_size`` gives an exact sliding window. ``use_cache=False`` runs
the same schedule with a full forward pass over each window every step: the reference
the cache is tested against.

An empty prompt starts from the end-of-text token, as GPT-2 does for unconditional
samples (that token is context only, never output). A prompt longer than ``block_size``
tokens keeps its last ``block_size`` tokens (the CLI and the server warn).

Sampling is per row (``logits.py``): the repetition penalty counts the row's own prompt
and tokens, top-k/top-p filter its logits, and it draws from its own ``torch.Generator``
(seeded with its ``cfg.seed``; fresh when None), one number per token. So a row's
completion does not depend on which other rows share its steps, up to float rounding:
a batched matrix product may round differently from a single row's, which can flip a
draw or an argmax only at a near-tie.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import invalid
from ..model.decode import CachedDecoder, TopLogits, UncachedDecoder
from ..model.gpt import GPT
from .logits import draw
from .sampling import SamplingConfig, _is_int
from .scoring import Scored, top_alternatives

__all__ = ["Engine", "Row"]


@dataclass(eq=False)
class Row:
    """One completion in flight. Read ``finished``/``finish_reason``; call :meth:`cancel`
    to end it early (a stop string, a client gone): it leaves before the next forward pass.

    ``finish_reason``: "stop" (end-of-text, or cancelled with that reason), "length"
    (``max_new_tokens`` produced), or what :meth:`cancel` was given.
    """

    cfg: SamplingConfig
    context: list[int]                  # every id so far; the window is context[start:]
    seen: list[int]                     # ids the repetition penalty counts
    generator: torch.Generator | None
    tag: Any = None                     # the caller's own handle (an index, a request)
    start: int = 0
    produced: int = 0
    finish_reason: str | None = None
    pending: int | None = field(default=None, repr=False)  # the token to feed next step
    logits: torch.Tensor | TopLogits | None = field(default=None, repr=False)  # the next token's
    slot: int | None = None
    logprobs: int | None = None         # report each token's log-probability and this many alternatives
    scored: Scored | None = None        # ...the last token's (with ``logprobs``): see scoring.py

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self, reason: str = "stop") -> None:
        if self.finish_reason is None:
            self.finish_reason = reason


def _top(row: Row, vocab: int) -> int | None:
    """How many of the largest logits can decide the next token (None: all of them).
    The repetition penalty re-ranks logits, and log-probabilities normalise over all of
    them, so both need them all; so does a top-k of the whole vocabulary (``vocab``), which
    then draws over the ids in id order, as a row that needs them all does."""
    cfg = row.cfg
    if cfg.repetition_penalty != 1.0 or row.logprobs is not None:
        return None
    return 1 if cfg.greedy else cfg.top_k if 0 < cfg.top_k < vocab else None


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not (_is_int(value) and value >= low and (high is None or value <= high)):
        allowed = f"an integer >= {low}" if high is None else f"{low} <= {name} <= {high}"
        raise ValueError(invalid(name, value, allowed))


class Engine:
    """Continuous batching over one model (see the module docstring).

    ``vocab_size``: only ids below it are produced (a model's vocabulary may be padded
    beyond its tokenizer's, and those ids decode to nothing). ``eot_id``: the
    end-of-text token; a row stops before it when its ``cfg.stop_at_eot``, and an empty
    prompt starts from it. Use the model in eval mode (``load_checkpoint`` returns it so).
    Not thread-safe: one thread submits, steps and cancels (the server's worker does).
    """

    def __init__(self, model: GPT, *, max_rows: int = 1, eot_id: int | None = None,
                 vocab_size: int | None = None, crop_to: int | None = None, use_cache: bool = True,
                 device=None) -> None:
        block = model.config.block_size
        self.keep = max(1, block // 2) if crop_to is None else crop_to
        _check_int("crop_to", self.keep, 1, block)
        _check_int("max_rows", max_rows, 1)
        self.model, self.block, self.vocab = model, block, model.config.vocab_size
        self.device = next(model.parameters()).device
        if device is not None:
            wanted = torch.device(device)
            if wanted.type != self.device.type or wanted.index not in (None, self.device.index):
                raise ValueError(f"device={device!s} but the model is on {self.device}; move the model first")
        self.eot_id = eot_id
        self.max_rows = max_rows
        limit = self.vocab if vocab_size is None else min(self.vocab, vocab_size)
        self.decoder = (CachedDecoder if use_cache else UncachedDecoder)(model, max_rows, limit)
        self.active: list[Row] = []      # active[i] sits in decoder slot i
        self._stepped: tuple = ((), None)  # the last step's rows and their logits, as one batch
        self.waiting: deque[Row] = deque()

    # ------------------------------------------------------------------ rows in and out

    def submit(self, prompt_ids: Sequence[int], cfg: SamplingConfig | None = None, tag: Any = None,
               logprobs: int | None = None) -> Row:
        """Queue a completion of ``prompt_ids``; it is admitted at a coming step. With
        ``logprobs`` (n >= 0), after each step ``row.scored`` holds the token's
        log-probability and the n most probable alternatives."""
        cfg = cfg or SamplingConfig()
        ids = [int(i) for i in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} outside the model's vocabulary [0, {self.vocab})")
        seen = list(ids)
        if not ids and cfg.max_new_tokens:  # nothing to generate needs no context
            if self.eot_id is None or not 0 <= self.eot_id < self.vocab:
                raise ValueError(f"an empty prompt starts from the end-of-text token, but eot_id="
                                 f"{self.eot_id!r} is not in the model's vocabulary [0, {self.vocab})")
            ids = [self.eot_id]
        generator = None
        if not cfg.greedy:
            generator = torch.Generator(device=self.device)
            if cfg.seed is None:
                generator.seed()
            else:
                generator.manual_seed(cfg.seed)
        row = Row(cfg, ids, seen, generator, tag, start=max(0, len(ids) - self.block), logprobs=logprobs)
        if cfg.max_new_tokens == 0:
            row.finish_reason = "length"
        else:
            self.waiting.append(row)
        return row

    @property
    def busy(self) -> bool:
        """Whether any row is active or waiting."""
        return bool(self.active or self.waiting)

    def _retire(self) -> None:
        """Finished rows leave; rows from the end move into the freed slots, so the
        active rows always fill slots 0 .. n-1 (a step works on one contiguous block)."""
        kept = [r for r in self.active if not r.finished]
        if len(kept) < len(self.active):
            free = [r.slot for r in self.active[:len(kept)] if r.finished]
            movers = [r for r in self.active[len(kept):] if not r.finished]
            for slot, row in zip(free, movers):
                self.decoder.move(row.slot, slot)
                row.slot = slot
            self.active = sorted(kept, key=lambda r: r.slot)
        if any(r.finished for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if not r.finished)

    def _admit(self) -> None:
        """Prefill waiting rows into free slots. Rows admitted together with the same
        window (``--num-samples``) share one prefill: its cache is copied."""
        first_of: dict[tuple, Row] = {}
        while self.waiting and len(self.active) < self.max_rows:
            row = self.waiting.popleft()
            row.slot = len(self.active)
            self.active.append(row)
            window = tuple(row.context[row.start:])
            top = _top(row, self.decoder.limit)
            key = (window, top)  # a row's top depends on the depth
            twin = first_of.get(key)
            if twin is not None:
                self.decoder.move(twin.slot, row.slot)
                row.logits = twin.logits.clone()  # a copy: filters work on rows in place
            else:
                row.logits = self.decoder.prefill(row.slot, list(window), top)
                first_of[key] = row

    # ------------------------------------------------------------------ one step

    def step(self) -> list[tuple[Row, int | None]]:
        """Advance every active row by one token: ``[(row, token id), ...]`` in slot
        order; ``None`` instead of an id means the row drew end-of-text (with
        ``cfg.stop_at_eot``) and ends there. Check ``row.finished`` after each step."""
        self._retire()
        self._stepped = ((), None)
        feeding = [r for r in self.active if r.pending is not None]
        if feeding:
            self._forward(feeding)
        self._admit()
        if not self.active:
            return []
        # Before the draw, from the model's own logits: no temperature, penalty or filter.
        scoring = {id(r): torch.log_softmax(r.logits.float(), -1) for r in self.active if r.logprobs is not None}
        tokens = self._pick(self.active)
        events = []
        for row, token in zip(self.active, tokens):
            if row.logprobs is not None:
                lp = scoring[id(row)]
                row.scored = (float(lp[token]), top_alternatives(lp.unsqueeze(0), row.logprobs)[0])
            row.logits = None
            if row.cfg.stop_at_eot and token == self.eot_id:
                row.finish_reason = "stop"
                events.append((row, None))
                continue
            row.produced += 1
            events.append((row, token))
            row.context.append(token)
            if row.cfg.repetition_penalty != 1.0:
                row.seen.append(token)
            if row.produced == row.cfg.max_new_tokens:
                row.finish_reason = "length"  # no forward pass for a token nobody will read
            else:
                row.pending = token
        return events

    def _forward(self, rows: list[Row]) -> None:
        """One forward pass: each row's pending token at its next position. A row whose
        window is full is cropped and re-prefilled up to (not including) that token first."""
        top = self._shared_top(rows)
        for row in rows:
            if len(row.context) - row.start > self.block:
                row.start = len(row.context) - self.keep
                self.decoder.prefill(row.slot, row.context[row.start:-1], top)
        logits = self.decoder.step([r.pending for r in rows], top)
        self._stepped = (rows, logits)
        for i, row in enumerate(rows):
            row.logits = logits.row(i) if isinstance(logits, TopLogits) else logits[i]
            row.pending = None

    def _shared_top(self, rows: list[Row]) -> int | None:
        """The one screening depth every row can use: the largest top-k (None if any row
        needs every logit)."""
        tops = [_top(r, self.decoder.limit) for r in rows]
        return None if None in tops else max(tops)

    def _pick(self, rows: list[Row]) -> list[int]:
        """One token per row from its logits. Rows with the same settings are filtered
        and drawn as one batch (each from its own generator)."""
        out: list[int] = [0] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            c = row.cfg
            top = isinstance(row.logits, TopLogits)
            groups.setdefault((c.temperature, c.top_k, c.top_p, c.repetition_penalty, top), []).append(i)
        for (*_, top), members in groups.items():
            cfg = rows[members[0]].cfg
            if top:  # each row's candidates, as many as its draw reads (rows may hold more)
                width = 1 if cfg.greedy else cfg.top_k
                stepped, batch = self._stepped
                if len(members) == len(rows) == len(stepped) and all(a is b for a, b in zip(rows, stepped)):
                    logits = TopLogits(batch.values[:, :width], batch.ids[:, :width])  # one step's rows, as they came
                else:
                    logits = TopLogits(torch.stack([rows[i].logits.values[:width] for i in members]),
                                       torch.stack([rows[i].logits.ids[:width] for i in members]))
            else:
                logits = torch.stack([rows[i].logits for i in members])
            seen = [rows[i].seen for i in members] if cfg.repetition_penalty != 1.0 else None
            picked = draw(logits, cfg, [rows[i].generator for i in members], seen)
            for i, token in zip(members, picked):
                out[i] = token
        return out

    def run(self) -> list[tuple[Row, int | None]]:
        """Step until no row is left; every event in order (for callers that want it all)."""
        events = []
        while self.busy:
            events.extend(self.step())
        return events
