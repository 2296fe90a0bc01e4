"""Text generation: sampling strategies, a KV-cached decoding loop, streamed text.

Layers, bottom up:

* :class:`SamplingConfig` -- validated settings (errors name the field, the value and
  what is allowed).
* :func:`process_logits` -- repetition penalty -> temperature -> top-k -> top-p, and
  :func:`sample_token`, which draws from the result (argmax when temperature is 0).
* :func:`stream_ids` / :func:`generate_ids` -- the decoding loop over token ids.
* :func:`stream` / :func:`generate` -- text in, text out: UTF-8 safe streaming and
  stop strings.

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
"""

from __future__ import annotations

import codecs
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .model.decode import CachedDecoder, UncachedDecoder
from .model.gpt import GPT
from .sampling import SamplingConfig

__all__ = [
    "SamplingConfig", "process_logits", "sample_token", "apply_repetition_penalty",
    "apply_top_k", "apply_top_p", "stream_ids", "generate_ids", "decode_stream", "stream", "generate",
]


# --------------------------------------------------------------------------- logits


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
    vocab = model.config.vocab_size
    keep = max(1, block // 2) if crop_to is None else crop_to
    if not (isinstance(keep, int) and not isinstance(keep, bool) and 1 <= keep <= block):
        raise ValueError(f"crop_to={crop_to!r} is invalid; allowed: 1 <= crop_to <= block_size={block}")
    dev = _model_device(model, device)
    ids = [int(i) for i in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"prompt token id(s) {bad[:5]} outside the model's vocabulary [0, {vocab})")
    if cfg.max_new_tokens == 0:
        return
    seen = list(ids)  # what the repetition penalty counts: prompt + generated
    if not ids:
        if eot_id is None or not 0 <= eot_id < vocab:
            raise ValueError(f"an empty prompt starts from the end-of-text token, but eot_id={eot_id!r} "
                             f"is not in the model's vocabulary [0, {vocab})")
        ids = [eot_id]
    limit = vocab if vocab_size is None else min(vocab, vocab_size)
    penalize = cfg.repetition_penalty != 1.0
    generator = None if cfg.greedy else _make_generator(cfg.seed, dev)
    # How many of the largest logits can decide the next token (None: all of them).
    # The repetition penalty re-ranks logits, so it needs them all.
    top = None if penalize else 1 if cfg.greedy else cfg.top_k or None
    runner = (CachedDecoder(model, top=top, vocab_limit=limit) if use_cache
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


# --------------------------------------------------------------------------- text


def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def decode_stream(tokenizer, token_ids: Iterator[int], stop: Sequence[str] = ()) -> Iterator[str]:
    """Turn a stream of token ids into text pieces, honouring stop strings.

    Bytes go through an incremental UTF-8 decoder, so a character split across BPE
    tokens comes out whole once its last byte arrives (invalid bytes become U+FFFD).
    Text that could be the start of a stop string is held back until it is not; when a
    stop string appears, the text before it is yielded and the stream ends (and
    ``token_ids`` is closed, if it is a generator).
    """
    stops = tuple(stop)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    try:
        for token in token_ids:
            pending += decoder.decode(tokenizer.decode_bytes([token]))
            hold = 0
            if stops:
                cut = _stop_index(pending, stops)
                if cut is not None:
                    if cut:
                        yield pending[:cut]
                    return
                hold = _partial_stop(pending, stops)
            if len(pending) > hold:
                yield pending[:len(pending) - hold]
                pending = pending[len(pending) - hold:]
    finally:
        close = getattr(token_ids, "close", None)
        if close is not None:
            close()
    pending += decoder.decode(b"", final=True)
    if stops:
        cut = _stop_index(pending, stops)
        pending = pending if cut is None else pending[:cut]
    if pending:
        yield pending


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
