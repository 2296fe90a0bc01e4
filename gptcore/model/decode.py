"""Decoders: the model's forward pass for generation, one new token per row per step.

A decoder holds up to ``max_rows`` rows in numbered slots. ``prefill(slot, ids)`` runs a
row's window from position 0 and returns the next-token logits; ``step(tokens)`` feeds
one token to each of the rows in slots ``0 .. len(tokens) - 1``, each at its own position,
and returns their logits (rows, vocab_limit), fp32. Given ``top`` (only a row's ``top``
largest logits matter: greedy 1, top-k sampling k), both return :class:`TopLogits`
instead: those logits and their ids, exact, in order. Rows may sit at different positions:
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
from .native import HEAD_SIZES, WIDTH, NativeHead, NativeRows
from .native import library as native_library

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
    """One block's parameters for the fast step, matrices transposed to (in, out) for
    torch's addmm, or packed for NativeRows.linear (one or the other, never both: a copy
    per decoder): named, so no two can be swapped."""

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


class TopLogits(NamedTuple):
    """The ``top`` largest next-token logits of each row (all of them in a smaller
    vocabulary), exact fp32: ``values`` (rows, top) in descending order and their ``ids``
    (rows, top); equal logits in ascending id order, and a tie at the ``top``-th logit
    keeps the lowest ids. So greedy decoding (the first id: the lowest of the largest, as
    ``argmax`` picks) and top-k sampling (the first k) pick what they would from the whole
    vocabulary."""

    values: torch.Tensor
    ids: torch.Tensor

    def row(self, i: int) -> TopLogits:
        return TopLogits(self.values[i], self.ids[i])

    def clone(self) -> TopLogits:
        return TopLogits(self.values.clone(), self.ids.clone())


def _in_order(values: torch.Tensor, ids: torch.Tensor, top: int) -> TopLogits:
    """The ``top`` largest of each row's candidates ``values``/``ids`` (rows, n), by value
    descending and, among equal values, id ascending. Usually one sorted topk of one
    more than ``top`` whose values all differ: then no order among equals is left to fix.
    Otherwise one topk over integer keys that order exactly so: a float's bits read as an
    integer (negatives' magnitude bits flipped) order as the floats do, and the id fills
    the low 32 bits."""
    n = ids.size(-1)
    if top < n:
        first, at = values.topk(top + 1, dim=-1)
        if bool((first[:, 1:] < first[:, :-1]).all()):
            at = at[:, :top]
            return TopLogits(first[:, :top], ids.gather(-1, at))
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes 0.0, its equal
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    _, at = (bits * 2 ** 32 + (2 ** 32 - 1 - ids)).topk(min(top, n), dim=-1)
    return TopLogits(values.gather(-1, at), ids.gather(-1, at))


def _margin(top: int) -> int:
    """How many more candidates than ``top`` a row keeps: room for ties and, when the head
    was screened, for the ids within the error band of the ``top``-th logit."""
    return max(16, top // 4)


_FAN = 8          # blocks per block one level up
_DIRECT = 1024    # a row this short takes one topk


def _block_top(scores: torch.Tensor, top: int, band: torch.Tensor | None = None, extra: int | None = None):
    """Each row's ``n = top + extra`` (default ``_margin(top)``) largest ``scores`` (rows, V), and whether
    that set holds every id within ``band`` (rows, 1; 0 when None) of the row's ``top``-th
    largest score: ``(values, ids, complete)``, in no order, ``complete`` (rows, 1) bool.

    ``torch.topk`` over a whole vocabulary costs about as much per row as the decoding
    step around it (it copies and partially sorts all V scores, and slows sharply past a
    few thousand). So the rows get a pyramid of strided block maxima, each level
    ``_FAN`` times shorter, up to one of at most ``_DIRECT``; from the top, each level
    keeps the n entries with the largest maxima and the next level down looks only at
    their children: a few topk over a few thousand entries each. An entry not kept has
    a maximum no larger than the smallest kept one, so if that lies below the band under
    the ``top``-th score at every level, nothing within the band was left out (and the
    ``top``-th kept score is the row's true one). One row takes one topk: torch's is
    fast for a single row; it is the batched kernel that slows sharply with length."""
    rows, vocab = scores.shape
    device = scores.device
    n = top + (_margin(top) if extra is None else extra)
    if n >= vocab:
        ids = torch.arange(vocab, device=device).expand(rows, -1)
        return scores, ids, torch.ones(rows, 1, dtype=torch.bool, device=device)
    levels = [scores]
    while rows > 1 and levels[-1].size(1) > _DIRECT and levels[-1].size(1) // _FAN >= n:
        m = levels[-1]
        nb = m.size(1) // _FAN
        levels.append(m[:, :nb * _FAN].view(rows, _FAN, nb).amax(1))  # block j: entries j, j + nb, ...
    values, ids = levels[-1].topk(n, dim=-1, sorted=False)
    floors = [values.amin(-1, keepdim=True)]
    fan = torch.arange(_FAN, device=device).view(1, _FAN, 1)
    for below in reversed(levels[:-1]):
        nb = below.size(1) // _FAN
        children = (ids.unsqueeze(1) + nb * fan).view(rows, -1)
        if nb * _FAN < below.size(1):  # the last few entries belong to no block: always looked at
            children = torch.cat([children, torch.arange(nb * _FAN, below.size(1), device=device).expand(rows, -1)], 1)
        values, at = below.gather(1, children).topk(n, dim=-1, sorted=False)
        ids = children.gather(1, at)
        floors.append(values.amin(-1, keepdim=True))
    kth = values.topk(top, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    cut = kth if band is None else kth - band
    complete = torch.cat(floors, 1).amax(-1, keepdim=True) < cut
    return values, ids, complete


def exact_top(logits: torch.Tensor, top: int) -> TopLogits:
    """Each row's top ``top`` of the exact ``logits`` (rows, V), as :class:`TopLogits`."""
    if top == 1:  # greedy: argmax gives the first (lowest) id of a tie
        ids = logits.argmax(-1, keepdim=True)
        return TopLogits(logits.gather(-1, ids), ids)
    if logits.size(0) == 1:  # one row: torch's topk is fast, and _in_order takes one
        return _in_order(logits, torch.arange(logits.size(-1), device=logits.device).expand_as(logits), top)
    values, ids, complete = _block_top(logits, top)
    if not bool(complete.all()):  # ties across the margin: every id
        values, ids = logits, torch.arange(logits.size(-1), device=logits.device).expand_as(logits)
    return _in_order(values, ids, top)


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

    def prefill(self, slot: int, ids: list[int], top: int | None = None) -> torch.Tensor | TopLogits | None:
        self.windows[slot] = list(ids)
        if not ids:
            return None
        logits = self._last_logits(self.windows[slot])
        return logits if top is None else exact_top(logits[None], top).row(0)

    def step(self, tokens: list[int], top: int | None = None) -> torch.Tensor | TopLogits:
        for window, token in zip(self.windows, tokens):
            window.append(token)
        logits = torch.stack([self._last_logits(w) for w in self.windows[:len(tokens)]])
        return logits if top is None else exact_top(logits, top)

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

    ``native_rows`` (None: wherever the native library is built, on a CPU in fp32, once a
    first check on the model agrees with torch's step; False: torch's kernels; True:
    forced, unchecked, an error where it can't run): every block of a step in one call
    through :class:`NativeRows`, whose arithmetic for a row does not depend on the other
    rows (torch picks a matrix-product kernel by the number of rows, and attends over the
    longest row's span under a mask), and with none of the ~50 per-operation dispatches
    a 4-layer step costs in Python; with the native head too (the usual choice for several
    rows here, forced by ``screen="native"``) a row's logits have the same bits alone and
    beside any other rows.

    ``top`` (per call): when only the ``top`` largest logits of each row matter, the head
    that selects them fastest here runs (``screen`` None: timed once per model; False: the
    fp32 head; True/"bf16"/"fp16"/"native": forced): the fp32 head, each row's top then
    selected from it (``_block_top``); a screen, bf16 (CPUs with AMX or AVX-512 BF16, GPUs)
    or fp16 weights (FBGEMM; AVX2 CPUs) streaming half the bytes of the head, which is
    most of a step, and only the ids that can still be among a row's top recomputed in
    fp32 (``_screened``); or the native kernel (``native.py``: the fp32 head streamed once
    for up to 8 rows and the top selected in the same C call). Either way the result is
    the exact :class:`TopLogits`, so greedy and top-k sampling pick what they would from
    all the fp32 logits (up to the rounding of the fp32 products themselves). A model
    with a logit soft cap takes the fp32 head (see ``_logits``).
    """

    def __init__(self, model: GPT, max_rows: int = 1, vocab_limit: int | None = None,
                 screen: bool | str | None = None, native_rows: bool | None = None) -> None:
        self.model = model
        self.screen = screen  # None: screen where that is timed faster (tests force it)
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
        self.kernels = self._native_rows(native_rows)
        if self.fast:
            tr = model.transformer

            def bias(lin):  # addmm needs a bias; adding exact zeros changes nothing
                if lin.bias is not None:
                    return lin.bias
                return torch.zeros(lin.out_features, device=w.device, dtype=w.dtype)

            def t(weight):  # (in, out) row-major: a vector-matrix product streams it in order
                return NativeRows.pack(weight.t()) if self.kernels else weight.t().contiguous()

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
            if self.kernels:
                self.kernels.blocks([lw._asdict() for lw in self.layers], self.kv, rms=cfg.norm == "rmsnorm",
                                    qk_norm=cfg.qk_norm, relu2=cfg.mlp_activation == "relu2", eps=self.eps)
            self.wte = tr.wte.weight
            self.wpe = tr.wpe.weight if "wpe" in tr else None  # None: rotary positions
            self.ln_f = norm(tr.ln_f)
            self.rms, self.qk_norm = cfg.norm == "rmsnorm", cfg.qk_norm
            self.act = relu2 if cfg.mlp_activation == "relu2" else (lambda h: F.gelu(h, approximate="tanh"))
        self.head = w[:self.limit]
        self.packable = _packable(w)
        # (several rows?, can a screen run at this top?) -> the screen or NativeHead (False: the fp32 head)
        self._chosen: dict[tuple[bool, bool], tuple | NativeHead | bool] = {}
        self._screens = self._misses = 0  # screened heads, and those that fell back to the exact one

    def _native_rows(self, wanted: bool | None) -> NativeRows | None:
        """NativeRows for this model's step, or None: eval mode, CPU, fp32, a head size
        rows_attend takes, layer widths in whole panels, and the library built (``wanted``
        True: all of that, or a ValueError saying what is missing)."""
        if wanted is False:
            return None
        widths = [lin.out_features for b in self.model.transformer.h
                  for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        dtype = self.model.lm_head.weight.dtype
        missing = ("training mode" if not self.fast else f"device {self.device.type}" if self.device.type != "cpu"
                   else f"dtype {dtype}" if dtype != torch.float32
                   else f"head size {self.hs} (takes {HEAD_SIZES})" if self.hs not in HEAD_SIZES
                   else f"layer widths {sorted(set(widths))} (multiples of {WIDTH})" if any(n % WIDTH for n in widths)
                   else None)
        lib = native_library() if missing is None else None
        if wanted and lib is None:
            why = missing or "no library (python -m gptcore.model.native says why)"
            raise ValueError(f"native_rows=True needs eval mode on a CPU in fp32, a head size in {HEAD_SIZES}, "
                             f"layer widths in multiples of {WIDTH} and the native library: {why}")
        if lib is None or (wanted is None and not _derived(self.model, "rows_agree", self.limit, self._rows_agree)):
            return None
        return NativeRows(lib, self.block)

    def _rows_agree(self) -> bool:
        """Once per model (and weights version): do the native blocks give torch's step to
        fp32 rounding on this model? Two rows at different positions, a few steps; a
        kernel the compiler got wrong for this shape must not decode."""
        decoders = [CachedDecoder(self.model, max_rows=2, vocab_limit=self.limit, native_rows=n) for n in (True, False)]
        longer = max(1, min(5, self.block - 3))  # a row ahead of the other, within a small context
        prompts = [[i % self.limit for i in range(longer)], [7 % self.limit]]
        agree = True
        for d in decoders:
            for slot, prompt in enumerate(prompts):
                d.prefill(slot, prompt)
        for i in range(min(3, self.block - longer)):
            got, want = (d._hidden([(3 * i + 1) % self.limit, (5 * i + 2) % self.limit]) for d in decoders)
            agree = agree and bool(((got - want).abs() <= 1e-3 * (1 + want.abs())).all())
        return agree

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
        logits = self._logits(h, top)
        return logits.row(0) if isinstance(logits, TopLogits) else logits[0]

    def move(self, src: int, dst: int) -> None:
        """Copy the row in ``src`` (its cached positions) into ``dst``."""
        n = self.lengths[src]
        for b in self.kv:
            b[dst, :, :, :n] = b[src, :, :, :n]
        self.lengths[dst] = n

    def _logits(self, x: torch.Tensor, top: int | None) -> torch.Tensor | TopLogits:
        """Next-token logits from the final-norm output ``x`` (rows, C), soft-capped when
        the model caps them: all of them (rows, limit) when ``top`` is None, else each
        row's exact top (:class:`TopLogits`; the cap keeps the order, so it is applied
        after the selection)."""
        cap = self.model.config.logit_softcap
        if top is None:
            logits = self._dense(x)
            return soft_cap(logits, cap) if cap else logits
        # Neither screened nor native with a soft cap: tanh's saturation can make an id they
        # left out equal, once capped, to the top-th logit, a tie the dense path breaks by id.
        choice = self._choice(x.size(0), top) if not cap else None
        if isinstance(choice, NativeHead) and top < choice.vocab:
            return TopLogits(*choice.top(x, top))
        found = self._screened(x, top, choice) if isinstance(choice, tuple) else None
        if found is None:  # not screened here, or the screen's check failed: the exact head
            logits = self._dense(x)
            return exact_top(soft_cap(logits, cap) if cap else logits, top)
        values, ids = found
        return _in_order(soft_cap(values, cap) if cap else values, ids, top)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every logit (rows, limit), fp32, uncapped."""
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

    def _head_t(self) -> torch.Tensor:
        return _derived(self.model, "head_t", self.limit, lambda: self.head.t().contiguous())

    # ------------------------------------------------------------------ the screened head

    def _screen_kinds(self) -> dict:
        """The low-precision heads this machine has: name -> a function that builds
        ``(x -> approximate logits (rows, limit) fp32, the unit roundoff of x and of the
        output, the weights as they are multiplied)``. bf16 everywhere (fast with AMX,
        AVX-512 BF16 or a GPU; a slow reference kernel on AVX2; x and the output are rounded
        too); on x86 CPUs also fp16 weights through FBGEMM, which widens them to fp32 inside
        its kernel (F16C) and multiplies fp32 x, so AVX2 streams half the bytes too. fp16
        only while every weight fits its range."""
        head = self.head

        def bf16():
            w = _derived(self.model, "head_bf16", self.limit, lambda: head.to(torch.bfloat16))

            def approx(x):
                if x.device.type != "cuda":
                    return F.linear(x.to(torch.bfloat16), w).float()
                # cuBLAS may otherwise add partial sums in bf16, which the bound does not cover
                matmul = torch.backends.cuda.matmul
                allowed = matmul.allow_bf16_reduced_precision_reduction
                matmul.allow_bf16_reduced_precision_reduction = False
                try:
                    return F.linear(x.to(torch.bfloat16), w).float()
                finally:
                    matmul.allow_bf16_reduced_precision_reduction = allowed

            return approx, 2.0 ** -8, 2.0 ** -8, w

        kinds = {"bf16": bf16}
        if (head.device.type == "cpu" and head.dtype == torch.float32
                and "fbgemm" in torch.backends.quantized.supported_engines
                and hasattr(torch.ops.quantized, "linear_prepack_fp16")
                and _derived(self.model, "head_absmax", self.limit, lambda: float(head.abs().amax())) < 60000.0):
            def fp16():
                w = _derived(self.model, "head_fp16", self.limit,
                             lambda: torch.ops.quantized.linear_prepack_fp16(head.contiguous(), None))
                packed = torch.ops.quantized.linear_unpack_fp16(w)[0]  # the weights as FBGEMM multiplies them
                return (lambda x: torch.ops.quantized.linear_dynamic_fp16(x, w)), 0.0, 0.0, packed

            kinds["fp16"] = fp16
        return kinds

    def _make_screen(self, kind: str):
        """``(approximate head, radius)`` for screen ``kind``, or None when the kernel does
        not compute what the bound assumes (checked once on random rows: a kernel that
        rounded x or accumulated in low precision would break exactness).

        The radius bounds |exact - approximate| per row, for x (rows, C): with w' the
        weights as multiplied, x' = x rounded (unit roundoff u_x) and K = C,
        x.w - x'.w' = x.(w - w') + (x - x').w', so by Cauchy-Schwarz it is at most
        |x|_2 (max_v |w_v - w'_v|_2 + u_x max_v |w'_v|_2), plus the output's rounding
        (u_out times the largest |approximate logit| of the row) and the fp32 accumulation
        error of the approximate and the exact products, each under K 2^-24 |x|_2 |w_v|_2.
        The L2 norms of each vocabulary row's rounding error are precomputed: a bound of
        the size of the real error, not |x|_1 max|w| (tens of times larger)."""
        try:
            approx, u_x, u_out, w_low = self._screen_kinds()[kind]()
        except RuntimeError:  # a kernel this build or CPU can't run: decode without it
            return None

        def norms():  # in chunks of rows: float64 copies of a whole head would be large
            err = wnorm = 0.0
            for start in range(0, self.limit, 8192):
                w, low = self.head[start:start + 8192].double(), w_low[start:start + 8192].double()
                err = max(err, float((w - low).norm(dim=1).amax()))
                wnorm = max(wnorm, float(torch.maximum(w.norm(dim=1), low.norm(dim=1)).amax()))
            return err, wnorm

        err, wnorm = _derived(self.model, f"screen_norms_{kind}", self.limit, norms)
        accumulate = 2.02 * self.C * 2.0 ** -24
        per_x = err + wnorm * (1.01 * u_x + accumulate)

        def radius(x, y):
            r = x.norm(dim=-1, keepdim=True) * per_x
            return r + y.abs().amax(-1, keepdim=True) * (1.01 * u_out) if u_out else r

        for rows in (1, 3, 8):  # kernels are picked by shape: a vector, a few rows, a batch
            x = torch.randn(rows, self.C, device=self.device, dtype=self.head.dtype)
            x_low = x.to(torch.bfloat16) if u_x else x
            ref = x_low.double() @ w_low.double().t()
            try:
                y = approx(x)
            except RuntimeError:
                return None
            if not bool(((y.double() - ref).abs() <= x.double().norm(dim=-1, keepdim=True) * wnorm * accumulate
                         + y.double().abs() * 1.01 * u_out + 1e-30).all()):
                return None
        return approx, radius

    def _native(self) -> NativeHead | None:
        """The native kernel for this head (CPU, fp32, eval mode, a C compiler: see
        ``native.py``), or None."""
        if not (self.fast and self.device.type == "cpu" and self.head.dtype == torch.float32):
            return None
        lib = native_library()
        return _derived(self.model, "head_native", self.limit, lambda: NativeHead(lib, self.head)) if lib else None

    def _choice(self, rows: int, top: int):
        """How this decoder selects a head of ``rows`` rows' top: a screen ``(x ->
        approximate logits, (x, approximate) -> radius)``, the :class:`NativeHead`, or
        None for the fp32 head and ``exact_top``. Unless ``screen`` forces it (False: the
        fp32 head; True, "bf16" or "fp16": that screen; "native": the kernel; tests), whichever
        selects a row's top fastest here, timed once per model for one row and once for
        several: a screen streams fewer bytes, which pays most when several rows share the
        head, but it adds the recomputation; the native kernel streams the fp32 head once and
        selects without a full sort. Either way the top ids and logits are the fp32 ones, up
        to the rounding of the fp32 products themselves (which differs between kernels, as
        between one row and a batch): a token can change only at a near-tie of that size."""
        several = rows > 1
        screenable = top + _margin(top) <= self.limit // 8  # a screen keeps few enough candidates
        key = (several, screenable)
        if key not in self._chosen:
            # A screen only where it can run at this top; the native kernel only below the vocabulary.
            kinds = self._screen_kinds() if screenable else {}
            native = self._native() if top < self.limit else None
            kind = self.screen
            if kind is True:
                kind = "fp16" if "fp16" in kinds else "bf16"
            elif kind is None and (kinds or native):
                # Several rows are timed at this decoder's capacity: the native kernel streams
                # the head once per 8 rows, a screen once for all of them.
                timed = len(self.lengths) if several else 1
                kind = _derived(self.model, f"screen_kind_{int(several)}_{int(screenable)}_{timed}", self.limit,
                                lambda: self._fastest(kinds, native, timed, top))
            if kind == "native":
                self._chosen[key] = native or False
            else:
                self._chosen[key] = (self._made_screen(kind) if kind in kinds else None) or False
        return self._chosen[key] or None

    def _made_screen(self, kind: str):
        """``_make_screen(kind)``, once per model and weights version."""
        return _derived(self.model, f"screen_{kind}", self.limit, lambda: self._make_screen(kind))

    def _fastest(self, kinds: dict, native: NativeHead | None, rows: int, top: int) -> str | None:
        """Which head gives ``rows`` rows' top ``top`` fastest here: a screen's name (of
        ``kinds``), "native" (given ``native``), or None for fp32. Each is warmed up, then
        timed end to end in rounds that take the candidates in turn (a noisy neighbour slows
        them all alike), best of 5, on unit-variance rows like a final norm's output."""
        key = (rows > 1, top + _margin(top) <= self.limit // 8)
        x = F.layer_norm(torch.randn(rows, self.C, device=self.device, dtype=self.head.dtype), (self.C,))
        chosen = {None: False}
        for name in kinds:
            screen = self._made_screen(name)
            if screen:  # else its kernel failed the check
                chosen[name] = screen
        if native:
            chosen["native"] = native
        best = dict.fromkeys(chosen, float("inf"))
        for round_ in range(6):
            for name in chosen:
                self._chosen[key] = chosen[name]
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                self._logits(x, top)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if round_:  # the first round warms up: packed weights, caches
                    best[name] = min(best[name], time.perf_counter() - start)
        del self._chosen[key]
        self._screens = self._misses = 0
        return min(best, key=best.get)

    def _screened(self, x: torch.Tensor, top: int, screen) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each row's exact top ``top`` (and the ids in the screen's error band below it)
        from a low-precision head: ``(values, ids)``, not yet in order, or None when the
        screen can't vouch for its candidates (ties or outliers the band can't resolve).

        Every approximate logit is within ``r`` of the exact one (``_make_screen``). An id
        whose approximate logit is more than 2r below the ``top``-th largest cannot be in
        the exact top, so only a row's largest few, which hold every id above that band
        (``_block_top`` checks it), are recomputed in fp32, as one batched product."""
        approx, radius = screen
        y = approx(x)
        band = 2.02 * radius(x, y)  # 2r, and 1 % over the rounding of r's own arithmetic
        self._screens += 1
        for extra in (_margin(top), 4 * _margin(top), 16 * _margin(top)):  # more ids in the band: wider
            _, ids, complete = _block_top(y, top, band, extra)
            if bool(complete.all()):
                break
        else:
            self._misses += 1
            if self._screens >= 16 and self._misses * 4 > self._screens:
                self._chosen[x.size(0) > 1, True] = False  # logits too close for this screen's bound: stop trying
            return None
        rows, n = ids.shape
        weights = self.head.index_select(0, ids.reshape(-1)).view(rows, n, self.C)
        # Each logit one dot product, the same arithmetic in a batch of rows as alone
        # (torch.bmm with one column takes a path several times slower here).
        return (weights * x.unsqueeze(1)).sum(-1).float(), ids

    @torch.inference_mode()
    def step(self, tokens: list[int], top: int | None = None) -> torch.Tensor | TopLogits:
        """Feed ``tokens[i]`` to the row in slot ``i`` at its next position; logits (rows,
        limit), or each row's top ``top`` (:class:`TopLogits`)."""
        return self._logits(self._hidden(tokens), top)

    @torch.inference_mode()
    def _hidden(self, tokens: list[int]) -> torch.Tensor:
        """``step``'s forward pass: the rows' final-norm outputs (rows, C)."""
        B = len(tokens)
        lengths = self.lengths[:B]
        if max(lengths) >= self.block:
            raise ValueError(f"KV cache full ({max(lengths)} positions); crop and prefill again")
        if not self.fast:
            return torch.cat([self._module_hidden(b, token) for b, token in enumerate(tokens)])
        C, nh, hs, eps, shape = self.C, self.nh, self.hs, self.eps, (self.C,)
        addmm, act, sdpa, kernels = torch.addmm, self.act, F.scaled_dot_product_attention, self.kernels

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
            mask = None if kernels else (torch.arange(span, device=self.device) <= at[:, None]).view(B, 1, 1, span)
            x = self.wte[torch.tensor(tokens, device=self.device)]
        if self.wpe is not None:
            x = x + (self.wpe[pos] if uniform else self.wpe[at])
        else:  # rotary: each row's angles, broadcast over heads
            where = torch.tensor([pos], device=self.device) if uniform else at
            cos, sin = rope_angles(where, hs)
            if kernels:  # (rows, hs/2) for the kernel
                cos, sin = (a.expand(B, hs // 2).contiguous() for a in (cos, sin))
            else:
                cos, sin = (a.view(-1, 1, 1, hs // 2) for a in (cos, sin))
        if kernels:  # every block in one native call; x is a copy (it may view the embedding table)
            x = kernels.step(x.clone(memory_format=torch.contiguous_format), lengths,
                             *((cos, sin) if self.wpe is None else ()))
        for lw, kv in zip(self.layers, self.kv if not kernels else ()):
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
        return norm(x, *self.ln_f)

    def _module_hidden(self, slot: int, token: int) -> torch.Tensor:
        """One row through ``nn.Module`` calls (training mode: dropout as in training):
        its final-norm output (1, C)."""
        cache = self._slot_cache(slot, self.lengths[slot])
        idx = torch.tensor([[token]], dtype=torch.long, device=self.device)
        h = self.model.hidden_states(idx, cache)[:, -1]
        self.lengths[slot] = cache.length
        return h
