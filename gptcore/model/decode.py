"""Single-sequence decoders for generation: prefill a window, then one token per step.

Both return the next-token logits (fp32, shape (vocab,)). :class:`CachedDecoder` keeps a
KV cache; :class:`UncachedDecoder` recomputes the whole window every step and is the
reference the cache is tested against. They live beside the model because the fast
step below restates the model's block equations (``gpt.py``); tests compare the two at
every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gpt import GPT, KVCache


class UncachedDecoder:
    """Reference runner: a full forward pass over the whole window every step."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.window: list[int] = []
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.window = list(ids)
        idx = torch.tensor([self.window], dtype=torch.long, device=self.device)
        logits, _ = self.model(idx)
        return logits[0, -1].float()

    def step(self, token: int) -> torch.Tensor:
        return self.prefill(self.window + [token])


class CachedDecoder:
    """KV-cached runner: ``prefill`` fills the cache from position 0, ``step`` adds one.

    The cache is one preallocated buffer per layer, (1, 2, n_head, block_size, head_size)
    holding K and V side by side, so a decoding step writes both with one copy; the
    :class:`KVCache` handed to the model for prefill views the same memory.

    In eval mode a step bypasses ``nn.Module`` calls and runs the block equations on the
    model's own parameters (views, no copies): single-token decoding on a CPU is bound by
    per-operation overhead, not arithmetic. It computes what ``GPT.forward`` computes
    (tests compare the two at every step); dropout is off in eval mode, and for one query
    the "sdpa" and "math" attentions are the same softmax(q K^T / sqrt(d)) V. In training
    mode (dropout on) steps go through ``GPT.hidden_states``.
    """

    def __init__(self, model: GPT) -> None:
        self.model = model
        cfg = model.config
        self.C, self.nh = cfg.n_embd, cfg.n_head
        self.hs = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_eps
        w = model.lm_head.weight
        self.kv = [torch.empty(1, 2, cfg.n_head, cfg.block_size, self.hs, device=w.device, dtype=w.dtype)
                   for _ in range(cfg.n_layer)]
        self.cache = KVCache(k=[b[:, 0] for b in self.kv], v=[b[:, 1] for b in self.kv])
        self.fast = not model.training
        if self.fast:
            tr = model.transformer

            def bias(lin):  # addmm needs a bias; adding exact zeros changes nothing
                return lin.bias if lin.bias is not None else torch.zeros(lin.out_features, device=w.device, dtype=w.dtype)

            self.layers = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight.t(), bias(b.attn.c_attn),
                            b.attn.c_proj.weight.t(), bias(b.attn.c_proj), b.ln_2.weight, b.ln_2.bias,
                            b.mlp.c_fc.weight.t(), bias(b.mlp.c_fc), b.mlp.c_proj.weight.t(), bias(b.mlp.c_proj),
                            kv[0]) for b, kv in zip(tr.h, self.kv)]
            self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
            self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
            self.head_t = w.t()

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.cache.length = 0
        idx = torch.tensor([ids], dtype=torch.long, device=self.model.lm_head.weight.device)
        h = self.model.hidden_states(idx, self.cache)[:, -1]  # only the last position's logits
        return self.model.lm_head(h)[0].float()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        if not self.fast:
            idx = torch.tensor([[token]], dtype=torch.long, device=self.model.lm_head.weight.device)
            return self.model.lm_head(self.model.hidden_states(idx, self.cache)[:, -1])[0].float()
        pos = self.cache.length
        if pos >= self.model.config.block_size:
            raise ValueError(f"KV cache full ({pos} positions); crop and prefill again")
        C, nh, hs, eps, shape = self.C, self.nh, self.hs, self.eps, (self.C,)
        layer_norm, addmm, gelu, sdpa = F.layer_norm, torch.addmm, F.gelu, F.scaled_dot_product_attention
        x = (self.wte[token] + self.wpe[pos]).view(1, C)
        for ln1w, ln1b, attn_w, attn_b, proj_w, proj_b, ln2w, ln2b, fc_w, fc_b, mlp_w, mlp_b, kv in self.layers:
            qkv = addmm(attn_b, layer_norm(x, shape, ln1w, ln1b, eps), attn_w).view(3, nh, 1, hs)
            kv[:, :, pos] = qkv[1:, :, 0]  # K and V of this position, one write
            y = sdpa(qkv[:1], kv[:1, :, :pos + 1], kv[1:, :, :pos + 1])  # (1, nh, 1, hs)
            x = x + addmm(proj_b, y.view(1, C), proj_w)
            x = x + addmm(mlp_b, gelu(addmm(fc_b, layer_norm(x, shape, ln2w, ln2b, eps), fc_w),
                                      approximate="tanh"), mlp_w)
        self.cache.length = pos + 1
        x = layer_norm(x, shape, self.ln_f[0], self.ln_f[1], eps)
        return torch.mm(x, self.head_t)[0].float()
