"""Fused LM-head + cross-entropy: the training fast path.

With GPT-2's 50,257-token vocabulary the LM head and its softmax dominate a small
model's step: materialising (tokens, vocab) logits, their log-softmax and its backward
costs several full passes over a huge tensor. Here the loss is computed chunk by chunk
(``chunk_size`` tokens at a time), and because the loss is a scalar, the gradient of
each chunk's logits (softmax - one_hot) is known in the forward pass: it is turned into
the input and weight gradients at once and the logits are dropped. Peak memory holds one
chunk of logits (chunk_size x vocab), never (tokens x vocab); the backward pass only
scales the stored gradients.

Two precisions:

* fp32, or no gradient (evaluation): logits are converted to fp32 and the loss is
  ``logsumexp - target logit``, exact for the logits the matmul produced.
* bf16/fp16 autocast with a gradient (training): the softmax runs as ONE kernel that
  reads the low-precision logits, computes in fp32 and writes low-precision
  probabilities, which are exactly what the two gradient matmuls consume. Every other
  full pass over (chunk x vocab) is gone (no fp32 copy of the logits, no separate
  logsumexp, exp, subtract, scale and cast), which is most of the step on a CPU. The
  loss is ``-log p_target`` from those probabilities: rounding p to bf16 moves
  ``log p`` by at most 2^-8 nats per token, and the errors average out over a batch
  (the test bounds the difference from the exact loss).

Logit soft-capping (``softcap`` > 0): the loss sees ``cap * tanh(logits / cap)``, and
each chunk's gradient is scaled by that function's derivative ``1 - tanh²`` before it
becomes the input and weight gradients.

Label smoothing (``smoothing`` = e > 0, training only): the target is (1 - e) one-hot +
e uniform, so the loss is ``(1 - e) (lse - z_t) + e (lse - mean(z))``, as
``F.cross_entropy(label_smoothing=e)`` defines it, and the logits' gradient is
``softmax - (1 - e) one_hot - e / vocab``. It is additive smoothing for the LM: every
token keeps about e / vocab of probability, so a token the training text never contains
is not driven towards zero probability.
"""

from __future__ import annotations

import torch

# Tokens per chunk: (chunk x vocab) logits stay small enough for the CPU's caches and
# memory bound (128 x 50,257 bf16 = 13 MB) while the gradient-accumulation matmul
# (vocab x chunk @ chunk x n_embd) is still efficient. Measured in bench/bench_train.py.
CHUNK_SIZE = 128
# Tokens whose logit gradients are kept for one weight-gradient matmul (GROUP x vocab).
GROUP_SIZE = 256


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(logits / cap)``: every logit within (-cap, cap), order kept; 0 = off."""
    return cap * torch.tanh(logits / cap) if cap else logits


def _spans(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of each ``size``-token piece of [start, stop): bounds how many logits exist at once."""
    return [(s, min(stop, s + size)) for s in range(start, stop, size)]


def _exact_nats(x: torch.Tensor, w: torch.Tensor, ts: torch.Tensor, softcap: float,
                smoothing: float) -> torch.Tensor:
    """Per-token loss of one chunk from fp32 logits: evaluation keeps no gradient, so it can afford exactness."""
    logits = soft_cap((x @ w.t()).float(), softcap)
    lse = torch.logsumexp(logits, dim=-1)
    nats = lse - logits.gather(1, ts.clamp(min=0)[:, None]).squeeze(1)
    if smoothing:
        nats = (1 - smoothing) * nats + smoothing * (lse - logits.mean(dim=-1))
    return nats


def _logits_into(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, softcap: float) -> torch.Tensor | None:
    """Capped logits into ``out``, which becomes their gradient; the cap's fp32 tanh is kept for its derivative."""
    torch.mm(x, w.t(), out=out)
    if not softcap:
        return None
    tanh = torch.tanh(out.float() / softcap)
    torch.mul(tanh, softcap, out=out)
    return tanh


def _softmax_nats(g: torch.Tensor, rows: torch.Tensor, safe_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nats, p_target), turning the logits in ``g`` into probabilities in place: no second (chunk x vocab) buffer."""
    if g.dtype != torch.float32:
        # one kernel: reads the low-precision logits, fp32 inside, writes low-precision probabilities
        torch.softmax(g, dim=-1, out=g)
        p_t = g[rows, safe_t].float()
        return -torch.log(p_t), p_t
    lse = torch.logsumexp(g, dim=-1)
    nats = lse - g[rows, safe_t]
    torch.exp(g.sub_(lse[:, None]), out=g)
    return nats, g[rows, safe_t]


def _chunk_loss_and_grad(x: torch.Tensor, w: torch.Tensor, ts: torch.Tensor, g: torch.Tensor, softcap: float,
                         smoothing: float, any_ignored: bool) -> torch.Tensor:
    """Per-token loss, leaving d loss / d logits in ``g``: the loss is a scalar, so the logits need never be kept."""
    rows, safe_t = torch.arange(ts.size(0), device=x.device), ts.clamp(min=0)
    tanh = _logits_into(x, w, g, softcap)
    if smoothing:  # read before the softmax overwrites the logits
        z_t, z_mean = g[rows, safe_t].float(), g.mean(dim=-1, dtype=torch.float32)
    nats, p_t = _softmax_nats(g, rows, safe_t)
    if smoothing:
        # lse - mean(z) = (z_t - log p_t) - mean(z): no second pass for lse
        nats = (1 - smoothing) * nats + smoothing * (z_t + nats - z_mean)
        g.sub_(smoothing / g.size(1))
    # d loss / d logits = softmax - target (zero for ignored rows)
    g[rows, safe_t] = (p_t - (1 - smoothing) - smoothing / g.size(1)).to(g.dtype)
    if softcap:  # through the cap: times d(cap tanh(l / cap))/dl = 1 - tanh²
        g.mul_(tanh.square_().neg_().add_(1))
    if any_ignored:
        valid = ts != -1
        g.mul_(valid[:, None].to(g.dtype))
        nats = nats * valid
    return nats


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, group_size: int, compute_dtype: torch.dtype,
                need_grad: bool, softcap: float = 0.0, smoothing: float = 0.0) -> torch.Tensor:
        # x: (N, C) hidden states, weight: (V, C) LM head, targets: (N,) with -1 = ignore
        N, V = x.size(0), weight.size(0)
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        # Reading the answer is a host sync on a GPU (and a graph break under compile):
        # there, always mask. Masking by 1.0 is exact, so the numbers are the same.
        any_ignored = x.device.type != "cpu" or bool((targets == -1).any())
        if not need_grad:  # evaluation: the exact loss is all we want
            for start, end in _spans(0, N, chunk_size):
                ts = targets[start:end]
                nats = _exact_nats(x[start:end].to(compute_dtype), w, ts, softcap, smoothing)
                total += (nats * (ts != -1)).sum() if any_ignored else nats.sum()
            ctx.save_for_backward(None, None)
            return total
        xc = x.to(compute_dtype)
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        # d loss / d logits of GROUP tokens are kept, so the weight gradient is one matmul
        # per group (inner dimension GROUP) instead of one small, memory-bound one per chunk.
        group = min(N, group_size)
        g = torch.empty((group, V), dtype=compute_dtype, device=x.device)
        for g_start, g_end in _spans(0, N, group):
            for start, end in _spans(g_start, g_end, chunk_size):
                gs = g[start - g_start:end - g_start]
                total += _chunk_loss_and_grad(xc[start:end], w, targets[start:end], gs, softcap, smoothing,
                                              any_ignored).sum()
                grad_x[start:end] = (gs @ w).to(x.dtype)
            grad_w.add_(g[:g_end - g_start].t() @ xc[g_start:g_end])  # accumulates in fp32, no fp32 temporary
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        # In place: the graph is used once, and a fresh (vocab x n_embd) copy would raise
        # the step's peak memory by its size.
        grad_x.mul_(grad_out)
        grad_w = grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = CHUNK_SIZE, group_size: int = GROUP_SIZE,
                         softcap: float = 0.0, smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy of ``x @ weight.T`` (soft-capped at ``softcap`` when > 0)
    against ``targets`` (-1 ignored), label-smoothed by ``smoothing`` when > 0.

    ``chunk_size`` tokens' logits exist at a time; ``group_size`` tokens' logit gradients
    (rounded up to whole chunks) are kept for one weight-gradient matmul."""
    group_size = max(chunk_size, group_size // chunk_size * chunk_size)
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(x.device.type, enabled=False):
        return LinearCrossEntropy.apply(x, weight, targets.reshape(-1), chunk_size, group_size, dtype,
                                        need_grad, float(softcap), float(smoothing))
