"""Decoders for generation: prefill a window, then one token per step, for one sequence
or a batch of rows that decode side by side.

Both return next-token logits (fp32, over ``vocab_limit`` ids: those the tokenizer can
decode): ``prefill``/``step`` for one sequence, shape (vocab_limit,); ``prefill_rows``/
``step_rows`` for a batch, shape (rows, vocab_limit). :class:`CachedDecoder` keeps a KV
cache; :class:`UncachedDecoder` recomputes the whole window every step and is the
reference the cache is tested against. They live beside the model because the fast
step below restates the model's block equations (``gpt.py``); tests compare the two at
every step.

A batch's rows share positions (they all start from one prompt and advance one token per
step), so one ``cache.length`` serves every row and a crop re-prefills all rows at once.
``keep_rows`` drops finished rows, so they stop costing compute.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .gpt import GPT, KVCache

# Relative error bound of one bf16 rounding (8 significant bits), doubled for safety
# margin over fp32 accumulation error in both the screening and the exact products.
_BF16_BOUND = 2.0 ** -7


_DERIVED: "weakref.WeakKeyDictionary[GPT, dict]" = weakref.WeakKeyDictionary()


def _derived(model: GPT, name: str, limit: int, make):
    """``make()``, computed once per model and LM-head version: decoding from the same
    weights (the sample stage's prompts, an interactive session) reuses the copies; an
    optimizer step changes the weight's version and so rebuilds them."""
    w = model.lm_head.weight
    key = (name, limit, w.data_ptr(), w._version, w.device, w.dtype)
    cache = _DERIVED.setdefault(model, {})
    if cache.get(name, (None,))[0] != key:
        with torch.no_grad():
            cache[name] = (key, make())
    return cache[name][1]


class UncachedDecoder:
    """Reference runner: a full forward pass over the whole window every step."""

    def __init__(self, model: GPT, vocab_limit: int | None = None, batch_size: int = 1) -> None:
        self.model = model
        self.batch = batch_size
        self.window = torch.empty(batch_size, 0, dtype=torch.long)  # (rows, T)
        self.device = next(model.parameters()).device
        self.limit = model.config.vocab_size if vocab_limit is None else vocab_limit

    @torch.inference_mode()
    def prefill_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (rows, limit) after the windows ``idx`` (rows, T), or after one window
        (1, T) that every row shares."""
        self.window = idx.to(self.device).expand(self.batch, -1)
        logits, _ = self.model(self.window)
        return logits[:, -1, :self.limit].float()

    def step_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (rows, limit) after appending ``tokens`` (rows,), one per row."""
        return self.prefill_rows(torch.cat([self.window, tokens.to(self.device).view(-1, 1)], dim=1))

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only the rows at these batch positions, in this order."""
        self.window = self.window[rows]
        self.batch = len(rows)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        return self.prefill_rows(torch.tensor([ids], dtype=torch.long))[0]

    def step(self, token: int) -> torch.Tensor:
        return self.step_rows(torch.tensor([token]))[0]


class CachedDecoder:
    """KV-cached runner: ``prefill`` fills the cache from position 0, ``step`` adds one.

    The cache is one preallocated buffer per layer, (rows, 2, n_head, block_size,
    head_size) holding K and V side by side, so a decoding step writes both with one
    copy; the :class:`KVCache` handed to the model for prefill views the same memory.
    ``batch_size`` rows decode side by side; a batch's first prefill is usually one
    shared prompt, run once and copied into every row.

    In eval mode a step bypasses ``nn.Module`` calls and runs the block equations on the
    model's own parameters, transposed once into (in, out) layout: single-token decoding
    on a CPU is bound by per-operation overhead and by streaming the LM head, not by
    arithmetic (which is also why a batch of rows costs little more per step than one
    row: the weights are streamed once for all of them). The copies are made per
    decoder, so it must not outlive a weight update.

    ``top``: when only the ``top`` largest logits matter (greedy: 1; top-k sampling: k),
    a step screens the LM head in bf16 (half the bytes of the head to stream, which is
    most of a step) and recomputes in fp32 exactly the ids that can still be among the
    top: every logit's bf16 error is bounded (|x|_1 and the row's largest |w|), so an
    id whose upper bound is below the k-th largest lower bound cannot be in the top-k.
    The others come back as -inf; the top ``top`` are exact, ties included, so greedy
    and top-k sampling pick what they would from the full fp32 logits. It computes what ``GPT.forward`` computes
    (tests compare the two at every step); dropout is off in eval mode, and for one query
    the "sdpa" and "math" attentions are the same softmax(q K^T / sqrt(d)) V. In training
    mode (dropout on) steps go through ``GPT.hidden_states``.
    """

    def __init__(self, model: GPT, top: int | None = None, vocab_limit: int | None = None,
                 batch_size: int = 1) -> None:
        self.model = model
        cfg = model.config
        self.limit = cfg.vocab_size if vocab_limit is None else vocab_limit
        # Screening pays when a few candidates survive; with most of the vocabulary in play
        # (a tiny char vocabulary, a huge top_k) the plain fp32 head is as fast.
        self.top = top if top is not None and 0 < top <= self.limit // 8 else None
        self.C, self.nh = cfg.n_embd, cfg.n_head
        self.hs = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_eps
        self.batch = batch_size
        w = model.lm_head.weight
        self.device = w.device
        self.kv = [torch.empty(batch_size, 2, cfg.n_head, cfg.block_size, self.hs, device=w.device, dtype=w.dtype)
                   for _ in range(cfg.n_layer)]
        self.cache = self._view(self.kv)
        self.fast = not model.training
        if self.fast:
            tr = model.transformer

            def bias(lin):  # addmm needs a bias; adding exact zeros changes nothing
                return lin.bias if lin.bias is not None else torch.zeros(lin.out_features, device=w.device, dtype=w.dtype)

            def t(weight):  # (in, out) row-major: a vector-matrix product streams it in order
                return weight.t().contiguous()

            self.layers = [(b.ln_1.weight, b.ln_1.bias, t(b.attn.c_attn.weight), bias(b.attn.c_attn),
                            t(b.attn.c_proj.weight), bias(b.attn.c_proj), b.ln_2.weight, b.ln_2.bias,
                            t(b.mlp.c_fc.weight), bias(b.mlp.c_fc), t(b.mlp.c_proj.weight), bias(b.mlp.c_proj))
                           for b in tr.h]
            self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
            self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
            self.head = w[:self.limit]
            if self.top is None:
                # The LM head dominates a step: x @ W^T through a transposed view takes a slow
                # strided path (measured 3x slower on an AMD EPYC); a (C, V) copy does not.
                self.head_t = _derived(model, "head_t", self.limit, lambda: t(self.head))
            else:
                self.head_bf16, self.row_bound = _derived(model, "screen", self.limit, lambda: (
                    self.head.to(torch.bfloat16), self.head.abs().amax(dim=1) * _BF16_BOUND))

    @staticmethod
    def _view(kv: list[torch.Tensor], length: int = 0) -> KVCache:
        return KVCache(k=[b[:, 0] for b in kv], v=[b[:, 1] for b in kv], length=length)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """One sequence (batch_size 1): fill the cache with ``ids``; logits (limit,)."""
        return self.prefill_rows(torch.tensor([ids], dtype=torch.long))[0]

    def step(self, token: int) -> torch.Tensor:
        """One sequence (batch_size 1): feed ``token``; logits (limit,)."""
        return self.step_rows(token)[0]

    @torch.inference_mode()
    def prefill_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Fill the cache from position 0 with the windows ``idx`` (rows, T), or with one
        window (1, T) that every row shares (run once, its K and V copied into every row);
        logits (rows, limit) after the last position."""
        idx = idx.to(self.device)
        shared = idx.size(0) == 1 and self.batch > 1
        cache = self._view([b[:1] for b in self.kv]) if shared else self.cache
        self.cache.length = 0
        h = self.model.hidden_states(idx, cache)[:, -1]  # only the last position's logits
        logits = self.model.lm_head(h)[:, :self.limit].float() if not self.fast else self._logits(h)
        if shared:
            T = idx.size(1)
            for b in self.kv:
                b[1:, :, :, :T] = b[:1, :, :, :T]
            self.cache.length = T
            logits = logits.repeat(self.batch, 1)  # a copy per row: callers may filter rows in place
        return logits

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (rows, limit) from the final-LayerNorm output ``x`` (rows, C)."""
        if self.top is None:
            return torch.mm(x, self.head_t).float()
        return self._screened_logits(x)

    @torch.inference_mode()
    def step_rows(self, tokens: torch.Tensor | int) -> torch.Tensor:
        """Feed ``tokens`` (rows,), one per row, at the next position; logits (rows, limit).
        A one-row decoder also takes a plain int (no tensor to build per step)."""
        B = 1 if isinstance(tokens, int) else tokens.size(0)
        if not self.fast:
            idx = (torch.tensor([[tokens]], dtype=torch.long, device=self.device) if isinstance(tokens, int)
                   else tokens.to(self.device).view(B, 1))
            return self.model.lm_head(self.model.hidden_states(idx, self.cache)[:, -1])[:, :self.limit].float()
        pos = self.cache.length
        if pos >= self.model.config.block_size:
            raise ValueError(f"KV cache full ({pos} positions); crop and prefill again")
        C, nh, hs, eps, shape = self.C, self.nh, self.hs, self.eps, (self.C,)
        layer_norm, addmm, gelu, sdpa = F.layer_norm, torch.addmm, F.gelu, F.scaled_dot_product_attention
        x = (self.wte[tokens] + self.wpe[pos]).view(B, C)
        for (ln1w, ln1b, attn_w, attn_b, proj_w, proj_b, ln2w, ln2b, fc_w, fc_b, mlp_w, mlp_b), kv in zip(
                self.layers, self.kv):
            qkv = addmm(attn_b, layer_norm(x, shape, ln1w, ln1b, eps), attn_w).view(B, 3, nh, 1, hs)
            kv[:, :, :, pos] = qkv[:, 1:, :, 0]  # K and V of this position, one write
            y = sdpa(qkv[:, 0], kv[:, 0, :, :pos + 1], kv[:, 1, :, :pos + 1])  # (B, nh, 1, hs)
            x = x + addmm(proj_b, y.reshape(B, C), proj_w)
            x = x + addmm(mlp_b, gelu(addmm(fc_b, layer_norm(x, shape, ln2w, ln2b, eps), fc_w),
                                      approximate="tanh"), mlp_w)
        self.cache.length = pos + 1
        return self._logits(layer_norm(x, shape, self.ln_f[0], self.ln_f[1], eps))

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only the rows at these batch positions, in this order (finished samples
        leave the batch, so later steps cost nothing for them)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.kv = [b.index_select(0, index) for b in self.kv]
        self.cache = self._view(self.kv, self.cache.length)
        self.batch = len(rows)

    def _screened_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Exact fp32 logits (rows, limit) for every id that can be among some row's top
        ``self.top``; -inf elsewhere. Rows share one set of recomputed ids (their union):
        an id outside a row's own candidates is still exact, and still below that row's
        top ``self.top``, so it cannot change what the row picks."""
        xb = x.to(torch.bfloat16)
        approx = F.linear(xb, self.head_bf16).float()  # (rows, limit)
        # |x.w - xb.wb| <= 2^-8 (|x|_1 + |xb|_1) max|w| per row; bounded generously above.
        radius = (x.abs().sum(-1, keepdim=True) + xb.float().abs().sum(-1, keepdim=True)) * self.row_bound
        lower = approx - radius
        kth = lower.amax(-1, keepdim=True) if self.top == 1 else lower.topk(self.top, dim=-1).values[:, -1:]
        ids = (approx + radius >= kth).any(0).nonzero().squeeze(1)
        logits = torch.full((x.size(0), self.limit), float("-inf"), dtype=torch.float32, device=x.device)
        rows = self.head.index_select(0, ids)
        # One row: a matrix-vector product (the batch-1 path's exact arithmetic, unchanged).
        logits[:, ids] = (torch.mv(rows, x[0]).unsqueeze(0) if x.size(0) == 1 else torch.mm(x, rows.t())).float()
        return logits
