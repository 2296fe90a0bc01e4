"""Decoders: the model's forward pass for generation, one new token per row per step.

A decoder holds up to ``max_rows`` rows in numbered slots. ``prefill(slot, ids)`` runs a
row's window from position 0 and returns the next-token logits; ``step(tokens)`` feeds
one token to each of the rows in slots ``0 .. len(tokens) - 1``, each at its own position,
and returns their logits (rows, vocab_limit), fp32. Rows may sit at different positions:
that is what lets a server admit a new request while others are half way through.
``move(src, dst)`` copies a row to another slot (the engine keeps its rows in the first
slots, so a step works on one contiguous block).

:class:`CachedDecoder` keeps a KV cache per slot; :class:`UncachedDecoder` recomputes the
whole window every step and is the reference the cache is tested against. They live
beside the model because the fast step below restates the model's block equations
(``gpt.py``); tests compare the two at every step.
"""

from __future__ import annotations

import time
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .gpt import GPT, KVCache, apply_rope, relu2, rope_angles
from .loss import soft_cap

# Relative error bound of one bf16 rounding (8 significant bits), doubled for safety
# margin over fp32 accumulation error in both the screening and the exact products.
_BF16_BOUND = 2.0 ** -7


_DERIVED: weakref.WeakKeyDictionary[GPT, dict] = weakref.WeakKeyDictionary()


def _derived(model: GPT, name: str, limit: int, make):
    """``make()``, computed once per model and LM-head version: decoding from the same
    weights (the sample stage's prompts, a server's requests) reuses the copies; an
    optimizer step changes the weight's version and so rebuilds them."""
    w = model.lm_head.weight
    key = (name, limit, w.data_ptr(), w._version, w.device, w.dtype)
    cache = _DERIVED.setdefault(model, {})
    if cache.get(name, (None,))[0] != key:
        with torch.no_grad():
            cache[name] = (key, make())
    return cache[name][1]


class LayerWeights(NamedTuple):
    """One block's parameters for the fast step, matrices transposed to (in, out): named, so no two can be swapped."""

    ln_1_w: torch.Tensor
    ln_1_b: torch.Tensor | None  # None: RMSNorm
    attn_w: torch.Tensor
    attn_b: torch.Tensor
    attn_proj_w: torch.Tensor
    attn_proj_b: torch.Tensor
    ln_2_w: torch.Tensor
    ln_2_b: torch.Tensor | None
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    mlp_proj_w: torch.Tensor
    mlp_proj_b: torch.Tensor


def _packable(w: torch.Tensor) -> bool:
    """Whether this torch has oneDNN's packed linear for a CPU float32 head (the ops
    torch.compile's CPU backend uses; a build without them, another device or another
    dtype takes torch.mm)."""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class UncachedDecoder:
    """Reference: a full forward pass over each row's whole window every step."""

    def __init__(self, model: GPT, max_rows: int = 1, vocab_limit: int | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.limit = model.config.vocab_size if vocab_limit is None else vocab_limit
        self.windows: list[list[int]] = [[] for _ in range(max_rows)]

    @property
    def lengths(self) -> list[int]:
        return [len(w) for w in self.windows]

    @torch.inference_mode()
    def _last_logits(self, window: list[int]) -> torch.Tensor:
        logits, _ = self.model(torch.tensor([window], dtype=torch.long, device=self.device))
        return logits[0, -1, :self.limit].float()

    def prefill(self, slot: int, ids: list[int], top: int | None = None) -> torch.Tensor | None:
        self.windows[slot] = list(ids)
        return self._last_logits(self.windows[slot]) if ids else None

    def step(self, tokens: list[int], top: int | None = None) -> torch.Tensor:
        for window, token in zip(self.windows, tokens):
            window.append(token)
        return torch.stack([self._last_logits(w) for w in self.windows[:len(tokens)]])

    def move(self, src: int, dst: int) -> None:
        self.windows[dst] = list(self.windows[src])


class CachedDecoder:
    """KV-cached decoder: ``prefill`` fills a slot's cache from position 0, ``step`` adds
    one position to each of the first rows.

    The cache is one zero-initialised buffer per layer, (max_rows, 2, n_head, block_size,
    head_size) holding K and V side by side, so a step writes both with one copy. Rows at
    different positions attend through a mask over the longest row's span; the slots
    beyond a row's own length hold zeros or an earlier row's (finite) values, which the
    mask gives zero weight. When every row sits at the same position no mask is needed,
    and one row runs exactly the arithmetic a single sequence always has.

    In eval mode a step bypasses ``nn.Module`` calls and runs the block equations on the
    model's own parameters, transposed once into (in, out) layout: single-token decoding
    on a CPU is bound by per-operation overhead and by streaming the LM head, not by
    arithmetic (which is also why a batch of rows costs little more per step than one
    row: the weights are streamed once for all of them). In training mode (dropout on)
    each row steps through ``GPT.hidden_states``.

    ``top`` (per call): when only the ``top`` largest logits of each row matter (greedy:
    1; top-k sampling: k), and bf16 is faster than fp32 here (``screen`` None: timed once
    per model; True/False: forced), the LM head is screened in bf16 (half the bytes of the head to
    stream, which is most of a step) and exactly the ids that can still be among some
    row's top are recomputed in fp32: every logit's bf16 error is bounded (|x|_1 and the
    row's largest |w|), so an id whose upper bound is below the k-th largest lower bound
    cannot be in the top-k. The others come back as -inf; the top ``top`` are exact,
    ties included, so greedy and top-k sampling pick what they would from the full fp32
    logits.
    """

    def __init__(self, model: GPT, max_rows: int = 1, vocab_limit: int | None = None,
                 screen: bool | None = None) -> None:
        self.model = model
        self.screen = screen  # None: screen where bf16 is timed faster (tests force True)
        cfg = model.config
        self.limit = cfg.vocab_size if vocab_limit is None else vocab_limit
        self.C, self.nh, self.block = cfg.n_embd, cfg.n_head, cfg.block_size
        self.hs = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_eps
        w = model.lm_head.weight
        self.device = w.device
        self.kv = [torch.zeros(max_rows, 2, cfg.n_head, cfg.block_size, self.hs, device=w.device, dtype=w.dtype)
                   for _ in range(cfg.n_layer)]
        self.lengths = [0] * max_rows
        self.fast = not model.training
        if self.fast:
            tr = model.transformer

            def bias(lin):  # addmm needs a bias; adding exact zeros changes nothing
                if lin.bias is not None:
                    return lin.bias
                return torch.zeros(lin.out_features, device=w.device, dtype=w.dtype)

            def t(weight):  # (in, out) row-major: a vector-matrix product streams it in order
                return weight.t().contiguous()

            def norm(ln):  # (weight, bias); RMSNorm has no bias
                return ln.weight, getattr(ln, "bias", None)

            def layer(b) -> LayerWeights:
                (ln_1_w, ln_1_b), (ln_2_w, ln_2_b) = norm(b.ln_1), norm(b.ln_2)
                return LayerWeights(
                    ln_1_w=ln_1_w, ln_1_b=ln_1_b, attn_w=t(b.attn.c_attn.weight), attn_b=bias(b.attn.c_attn),
                    attn_proj_w=t(b.attn.c_proj.weight), attn_proj_b=bias(b.attn.c_proj),
                    ln_2_w=ln_2_w, ln_2_b=ln_2_b, fc_w=t(b.mlp.c_fc.weight), fc_b=bias(b.mlp.c_fc),
                    mlp_proj_w=t(b.mlp.c_proj.weight), mlp_proj_b=bias(b.mlp.c_proj))

            self.layers = [layer(b) for b in tr.h]
            self.wte = tr.wte.weight
            self.wpe = tr.wpe.weight if "wpe" in tr else None  # None: rotary positions
            self.ln_f = norm(tr.ln_f)
            self.rms, self.qk_norm = cfg.norm == "rmsnorm", cfg.qk_norm
            self.act = relu2 if cfg.mlp_activation == "relu2" else (lambda h: F.gelu(h, approximate="tanh"))
        self.head = w[:self.limit]
        self.packable = _packable(w)

    @staticmethod
    def cache_bytes(model: GPT, max_rows: int) -> int:
        """The KV cache a decoder of ``max_rows`` allocates for ``model`` (all of it up front)."""
        cfg, w = model.config, model.lm_head.weight
        return cfg.n_layer * max_rows * 2 * cfg.block_size * cfg.n_embd * w.element_size()

    def _slot_cache(self, slot: int, length: int = 0) -> KVCache:
        return KVCache(k=[b[slot:slot + 1, 0] for b in self.kv], v=[b[slot:slot + 1, 1] for b in self.kv],
                       length=length)

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], top: int | None = None) -> torch.Tensor | None:
        """Fill ``slot`` with the window ``ids`` from position 0; the logits (limit,) after
        its last position (None for an empty window: nothing to predict from yet)."""
        self.lengths[slot] = 0
        if not ids:
            return None
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        h = self.model.hidden_states(idx, self._slot_cache(slot))[:, -1]  # only the last position's logits
        self.lengths[slot] = len(ids)
        return self._logits(h, top)[0]

    def move(self, src: int, dst: int) -> None:
        """Copy the row in ``src`` (its cached positions) into ``dst``."""
        n = self.lengths[src]
        for b in self.kv:
            b[dst, :, :, :n] = b[src, :, :, :n]
        self.lengths[dst] = n

    def _logits(self, x: torch.Tensor, top: int | None) -> torch.Tensor:
        """Next-token logits (rows, limit) from the final-LayerNorm output ``x`` (rows, C),
        soft-capped when the model caps them (order-preserving, so screening is unchanged)."""
        cap = self.model.config.logit_softcap
        logits = self._raw_logits(x, top)
        if not cap:
            return logits
        return torch.where(torch.isfinite(logits), soft_cap(logits, cap), logits)  # screened-out ids stay -inf

    def _raw_logits(self, x: torch.Tensor, top: int | None) -> torch.Tensor:
        # Screening pays when a few candidates survive (with most of the vocabulary in play,
        # a tiny char vocabulary or a huge top_k, the plain fp32 head is as fast) and when
        # this machine multiplies bf16 faster than fp32.
        if top is not None and 0 < top <= self.limit // 8:
            if self.screen is None:  # decided once per decoder (the weights do not change under it)
                self.screen = self._bf16_pays()
            if self.screen:
                return self._screened_logits(x, top)
        if not self.fast:
            return F.linear(x, self.head).float()
        if x.size(0) > 1 and self.packable:
            # Several rows make the head a small-M matrix product, which MKL's sgemm runs
            # at a fraction of the CPU's rate; oneDNN with the weight packed once for its
            # kernel is faster (docs/benchmarks.md, "Moved from code comments").
            packed = _derived(self.model, "head_packed", self.limit,
                              lambda: torch.ops.mkldnn._reorder_linear_weight(self.head.contiguous(), 8))
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        # The LM head dominates a step: x @ W^T through a transposed view takes a slow
        # strided path; a (C, V) copy does not. One row (a matrix-vector product
        # streaming the copy) is faster here than oneDNN.
        return torch.mm(x, self._head_t()).float()

    @torch.inference_mode()
    def step(self, tokens: list[int], top: int | None = None) -> torch.Tensor:
        """Feed ``tokens[i]`` to the row in slot ``i`` at its next position; logits (rows, limit)."""
        B = len(tokens)
        lengths = self.lengths[:B]
        if max(lengths) >= self.block:
            raise ValueError(f"KV cache full ({max(lengths)} positions); crop and prefill again")
        if not self.fast:
            return torch.cat([self._module_step(b, token, top) for b, token in enumerate(tokens)])
        C, nh, hs, eps, shape = self.C, self.nh, self.hs, self.eps, (self.C,)
        addmm, act, sdpa = torch.addmm, self.act, F.scaled_dot_product_attention

        def norm(h, w, b):
            return F.rms_norm(h, shape, w, eps) if self.rms else F.layer_norm(h, shape, w, b, eps)

        uniform = min(lengths) == max(lengths)
        if uniform:  # every row at one position: slices, no mask (one row: the single-sequence path)
            pos = lengths[0]
            span, mask = pos + 1, None
            x = self.wte[tokens[0] if B == 1 else torch.tensor(tokens, device=self.device)].view(B, C)
        else:
            at = torch.tensor(lengths, device=self.device)
            span = max(lengths) + 1
            rows = torch.arange(B, device=self.device)
            mask = (torch.arange(span, device=self.device) <= at[:, None]).view(B, 1, 1, span)
            x = self.wte[torch.tensor(tokens, device=self.device)]
        if self.wpe is not None:
            x = x + (self.wpe[pos] if uniform else self.wpe[at])
        else:  # rotary: each row's angles, broadcast over heads
            where = torch.tensor([pos], device=self.device) if uniform else at
            cos, sin = (a.view(-1, 1, 1, hs // 2) for a in rope_angles(where, hs))
        for lw, kv in zip(self.layers, self.kv):
            qkv = addmm(lw.attn_b, norm(x, lw.ln_1_w, lw.ln_1_b), lw.attn_w).view(B, 3, nh, 1, hs)
            q, kv_new = qkv[:, 0], qkv[:, 1:, :, 0]  # (B, nh, 1, hs), (B, 2, nh, hs)
            if self.qk_norm or self.wpe is None:  # the key changes before it is cached
                k = qkv[:, 1]
                if self.qk_norm:
                    q, k = F.rms_norm(q, (hs,), eps=eps), F.rms_norm(k, (hs,), eps=eps)
                if self.wpe is None:
                    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                kv_new = torch.stack((k[:, :, 0], qkv[:, 2, :, 0]), 1)
            if uniform:
                kv[:B, :, :, pos] = kv_new  # K and V of this position, one write
            else:
                kv[rows, :, :, at] = kv_new  # each row's own position
            y = sdpa(q, kv[:B, 0, :, :span], kv[:B, 1, :, :span], attn_mask=mask)  # (B, nh, 1, hs)
            x = x + addmm(lw.attn_proj_b, y.reshape(B, C), lw.attn_proj_w)
            h = act(addmm(lw.fc_b, norm(x, lw.ln_2_w, lw.ln_2_b), lw.fc_w))
            x = x + addmm(lw.mlp_proj_b, h, lw.mlp_proj_w)
        for b in range(B):
            self.lengths[b] += 1
        return self._logits(norm(x, *self.ln_f), top)

    def _module_step(self, slot: int, token: int, top: int | None) -> torch.Tensor:
        """One row through ``nn.Module`` calls (training mode: dropout as in training)."""
        cache = self._slot_cache(slot, self.lengths[slot])
        idx = torch.tensor([[token]], dtype=torch.long, device=self.device)
        h = self.model.hidden_states(idx, cache)[:, -1]
        self.lengths[slot] = cache.length
        return self._logits(h, top)

    def _head_t(self) -> torch.Tensor:
        return _derived(self.model, "head_t", self.limit, lambda: self.head.t().contiguous())

    def _bf16_pays(self) -> bool:
        """Whether the bf16 head is faster than the fp32 one here, timed once per model.
        CPUs with bf16 instructions (AMX, AVX-512 BF16) and GPUs stream half the bytes;
        on an AVX2-only CPU torch falls back to a reference bf16 kernel, slower than
        fp32. Either way the top ids are exact, so the choice changes speed, never tokens."""
        def measure():
            x = torch.randn(4, self.C, device=self.device, dtype=self.head.dtype)
            head_t = self._head_t()
            head_bf16 = _derived(self.model, "screen", self.limit, self._screen_weights)[0]
            runs = {"fp32": lambda: torch.mm(x, head_t), "bf16": lambda: F.linear(x.to(torch.bfloat16), head_bf16)}
            best = {}
            for name, run in runs.items():
                for _ in range(3):
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    start = time.perf_counter()
                    run()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
            return best["bf16"] < best["fp32"]

        return _derived(self.model, "bf16_pays", self.limit, measure)

    def _screen_weights(self):
        return self.head.to(torch.bfloat16), self.head.abs().amax(dim=1) * _BF16_BOUND

    def _screened_logits(self, x: torch.Tensor, top: int) -> torch.Tensor:
        """Exact fp32 logits (rows, limit) for every id that can be among some row's top
        ``top``; -inf elsewhere. Rows share one set of recomputed ids (their union): an id
        outside a row's own candidates is still exact, and still below that row's top
        ``top``, so it cannot change what the row picks."""
        head_bf16, row_bound = _derived(self.model, "screen", self.limit, self._screen_weights)
        xb = x.to(torch.bfloat16)
        approx = F.linear(xb, head_bf16).float()  # (rows, limit)
        # |x.w - xb.wb| <= 2^-8 (|x|_1 + |xb|_1) max|w| per row; bounded generously above.
        radius = (x.abs().sum(-1, keepdim=True) + xb.float().abs().sum(-1, keepdim=True)) * row_bound
        lower = approx - radius
        kth = lower.amax(-1, keepdim=True) if top == 1 else lower.topk(top, dim=-1).values[:, -1:]
        ids = (approx + radius >= kth).any(0).nonzero().squeeze(1)
        logits = torch.full((x.size(0), self.limit), float("-inf"), dtype=torch.float32, device=x.device)
        rows = self.head.index_select(0, ids)
        # One row: a matrix-vector product (the single-sequence path's exact arithmetic).
        logits[:, ids] = (torch.mv(rows, x[0]).unsqueeze(0) if x.size(0) == 1 else torch.mm(x, rows.t())).float()
        return logits
