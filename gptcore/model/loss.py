"""Fused LM-head + cross-entropy: the training fast path.

With GPT-2's 50,257-token vocabulary the LM head and its softmax dominate a small
model's step: materialising (tokens, vocab) logits, their log-softmax and its
backward costs several full passes over a huge tensor. Here the loss is computed
chunk by chunk, and because the loss is a scalar, the gradient of each chunk's
logits (softmax - one_hot) is known in the forward pass: it is turned into the
input and weight gradients at once and the logits are dropped. Peak memory holds
one chunk of logits; the backward pass only scales the stored gradients.

Matmuls run in the autocast dtype when autocast is on (bf16 on AMX CPUs and GPUs);
the softmax is always fp32.
"""

from __future__ import annotations

import torch


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, compute_dtype: torch.dtype, need_grad: bool) -> torch.Tensor:
        # x: (N, C) hidden states, weight: (V, C) LM head, targets: (N,) with -1 = ignore
        w = weight.to(compute_dtype)
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk_size):
            xs = x[start:start + chunk_size].to(compute_dtype)
            ts = targets[start:start + chunk_size]
            logits = (xs @ w.t()).float()  # (n, V)
            valid = ts != -1
            safe_t = ts.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - target_logit) * valid).sum()
            if not need_grad:  # evaluation: the loss is all we want
                continue
            # d loss / d logits = softmax - one_hot (zero for ignored rows), in place.
            probs = logits.sub_(lse[:, None]).exp_()
            probs.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
            probs.mul_(valid[:, None])
            g = probs.to(compute_dtype)
            grad_x[start:start + chunk_size] = (g @ w).to(x.dtype)
            grad_w += (g.t() @ xs).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, (grad_w * grad_out).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 4096) -> torch.Tensor:
    """Summed cross-entropy of ``x @ weight.T`` against ``targets`` (-1 ignored)."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(x.device.type, enabled=False):
        return LinearCrossEntropy.apply(x, weight, targets.reshape(-1), chunk_size, dtype, need_grad)
