"""A GPT-2-style decoder written from the equations.

Names follow GPT-2's own (``wte``, ``wpe``, ``c_attn``, ``c_proj``, ``ln_f``, ``lm_head``)
so that importing or exporting GPT-2 weights is a table, not a puzzle (see ``hf.py``).

``GPTConfig``'s variants (rotary positions, QK-norm, ReLU² MLPs, RMSNorm, zero-initialised
output projections, logit soft-capping) change single equations below; every one is off by default, which
is GPT-2 exactly. ``decode.py`` restates the same equations for fast decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GPTConfig
from .loss import linear_cross_entropy, soft_cap

ROPE_BASE = 10000.0  # RoFormer's base wavelength


def rope_angles(positions: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at integer ``positions``: (*positions.shape,
    head_size // 2). Computed per call (a few hundred numbers), so there is no table to
    size, save or move between devices."""
    inv = ROPE_BASE ** -(torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float32) / head_size)
    angles = positions.to(torch.float32)[..., None] * inv
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head's dimension pairs (i, i + head_size/2) of ``x`` (..., head_size)
    by the angles of its position; ``cos``/``sin`` broadcast against (..., head_size/2).
    A rotated key keeps only its own absolute position, so a cached one stays valid."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


@dataclass
class KVCache:
    """Keys and values of every layer for positions ``0 .. length-1``.

    Preallocated to ``block_size`` so a decoding step writes one slot instead of
    concatenating (which would copy the whole cache every token).
    """

    k: list[torch.Tensor]  # per layer: (B, nh, block_size, hs)
    v: list[torch.Tensor]
    length: int = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.impl = config.attn_impl
        self.dropout = config.dropout_p("attn")
        self.rope, self.qk_norm, self.eps = config.position == "rope", config.qk_norm, config.layer_norm_eps
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused Q, K, V
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout_p("attn"))
        self.resid_dropout = nn.Dropout(config.dropout_p("resid"))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        past = cache.length if cache is not None else 0
        if self.qk_norm:
            q, k = F.rms_norm(q, (hs,), eps=self.eps), F.rms_norm(k, (hs,), eps=self.eps)
        if self.rope:
            cos, sin = rope_angles(torch.arange(past, past + T, device=x.device), hs)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            cache.k[layer][:, :, past:past + T] = k
            cache.v[layer][:, :, past:past + T] = v
            k = cache.k[layer][:, :, :past + T]  # (B, nh, past+T, hs)
            v = cache.v[layer][:, :, :past + T]

        if self.impl == "math":
            y = self._math_attention(q, k, v, past)
        else:
            y = self._sdpa_attention(q, k, v, past)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concat heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _math_attention(self, q, k, v, past: int) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d_k) + causal mask) V, exactly as written."""
        T, S = q.size(-2), k.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
        # Query i sits at absolute position past+i and may see keys 0..past+i.
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att.float(), dim=-1).to(q.dtype)
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, T, hs)

    def _sdpa_attention(self, q, k, v, past: int) -> torch.Tensor:
        T, S = q.size(-2), k.size(-2)
        dropout_p = self.dropout if self.training else 0.0
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if T == 1:  # one new token attends to everything cached: no mask needed
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's "gelu_new" (tanh approximation), or relu(x)^2
        self.act = nn.GELU(approximate="tanh") if config.mlp_activation == "gelu" else relu2
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout_p("resid"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":  # rope: positions live in the attention's rotation
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout_p("embed")),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        # Tied embeddings: the head's own (vocab x n_embd) matrix is never allocated.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), since each block adds
        # two contributions to the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:  # each block starts as the identity (modded-nanogpt)
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, n_embd) for token ids ``idx`` (B, T)."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds block_size={self.config.block_size}; "
                "crop the input to the last block_size tokens")
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(past, past + T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.length = past + T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, return_logits: bool = True,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given ``targets`` (B, T), the mean cross-entropy.

        Targets equal to -1 are ignored. With ``return_logits=False`` the loss goes
        through the fused LM-head + cross-entropy (see ``loss.py``): same value and
        gradients, without materialising (B*T, vocab) logits; logits come back None.
        Training uses that path (through ``forward``, so DDP's hooks see it), with its
        ``label_smoothing`` (``train.label_smoothing``; evaluation never smooths).
        """
        x = self.hidden_states(idx, cache)
        if targets is not None and not return_logits:
            return None, self._fused_loss(x, targets, "mean", label_smoothing)
        logits = soft_cap(self.lm_head(x), self.config.logit_softcap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1, label_smoothing=label_smoothing)
        return logits, loss

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy through the fused path; ``reduction`` is "mean" or "sum"."""
        return self._fused_loss(self.hidden_states(idx), targets, reduction)

    def _fused_loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str,
                    label_smoothing: float = 0.0) -> torch.Tensor:
        total = linear_cross_entropy(x.reshape(-1, self.config.n_embd), self.lm_head.weight, targets,
                                     softcap=self.config.logit_softcap, smoothing=label_smoothing)
        if reduction == "sum":
            return total
        return total / (targets != -1).sum().clamp(min=1)
