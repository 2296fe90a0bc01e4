"""The GPT itself: size, tied head, math == sdpa, causality, KV cache, loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.model import GPT, KVCache

SMALL = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


def perturb(model: GPT, seed: int = 0) -> GPT:
    """Random LayerNorm weights and biases: they init to 1 and 0, which hides mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # every bias, and the LayerNorm weights
                noise = 0.1 * torch.randn(p.shape, generator=g)
                p.copy_(noise if name.endswith(".bias") else 1.0 + noise)
    return model


def twins(config: GPTConfig, seed: int = 0) -> tuple[GPT, GPT]:
    """The same weights under attn_impl="math" and attn_impl="sdpa"."""
    torch.manual_seed(seed)
    math_model = perturb(GPT(dataclasses.replace(config, attn_impl="math")), seed).eval()
    sdpa_model = GPT(dataclasses.replace(config, attn_impl="sdpa")).eval()
    sdpa_model.load_state_dict(math_model.state_dict())
    return math_model, sdpa_model


def test_default_model_has_7_259_008_parameters_and_a_tied_head():
    model = GPT(GPTConfig())
    assert model.num_parameters() == 7_259_008
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 7_259_008
    # Tied: the very same Parameter, hence the same storage, and no bias on the head.
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.lm_head.bias is None
    # The count by hand, so a change in the architecture shows up here.
    c = GPTConfig()
    per_layer = (2 * 2 * c.n_embd                                 # ln_1, ln_2
                 + c.n_embd * 3 * c.n_embd + 3 * c.n_embd         # c_attn
                 + c.n_embd * c.n_embd + c.n_embd                 # attn.c_proj
                 + c.n_embd * 4 * c.n_embd + 4 * c.n_embd         # c_fc
                 + 4 * c.n_embd * c.n_embd + c.n_embd)            # mlp.c_proj
    total = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_layer + 2 * c.n_embd
    assert total == 7_259_008


def test_tied_head_stays_tied_through_training_step():
    model = GPT(SMALL)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.randint(0, SMALL.vocab_size, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    opt.step()
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("config", [SMALL, GPTConfig()], ids=["small", "default"])
def test_math_and_sdpa_agree_on_outputs_and_every_gradient(config):
    math_model, sdpa_model = twins(config)
    g = torch.Generator().manual_seed(1)
    worst_logits = worst_grad = 0.0
    for B, T in [(2, 16), (1, config.block_size)]:
        idx = torch.randint(0, config.vocab_size, (B, T), generator=g)
        targets = torch.randint(0, config.vocab_size, (B, T), generator=g)
        targets[0, :3] = -1  # ignored positions take the same path in both
        for m in (math_model, sdpa_model):
            m.zero_grad(set_to_none=True)
        (lm, loss_m), (ls, loss_s) = math_model(idx, targets), sdpa_model(idx, targets)
        loss_m.backward()
        loss_s.backward()
        torch.testing.assert_close(ls, lm, atol=1e-5, rtol=0)
        torch.testing.assert_close(loss_s, loss_m, atol=1e-5, rtol=0)
        worst_logits = max(worst_logits, (ls - lm).abs().max().item())
        grads_s = dict(sdpa_model.named_parameters())
        for name, p in math_model.named_parameters():
            assert p.grad is not None and grads_s[name].grad is not None, name
            torch.testing.assert_close(grads_s[name].grad, p.grad, atol=1e-5, rtol=0, msg=name)
            worst_grad = max(worst_grad, (grads_s[name].grad - p.grad).abs().max().item())
    print(f"\n[math vs sdpa, {config.n_layer}x{config.n_embd}] max |logits diff| {worst_logits:.3g}, "
          f"max |grad diff| {worst_grad:.3g}")


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_causal_later_tokens_never_change_earlier_logits(impl):
    model = perturb(GPT(dataclasses.replace(SMALL, attn_impl=impl))).eval()
    g = torch.Generator().manual_seed(2)
    T = SMALL.block_size
    idx = torch.randint(0, SMALL.vocab_size, (2, T), generator=g)
    with torch.no_grad():
        base, _ = model(idx)
        for t in (0, 5, T - 2):
            changed = idx.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.randint(
                0, SMALL.vocab_size - 1, changed[:, t + 1:].shape, generator=g)) % SMALL.vocab_size
            out, _ = model(changed)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
            # ...and the change is visible afterwards, so the check above can fail.
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-3


def empty_cache(config, batch_size: int) -> KVCache:
    shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
    return KVCache(k=[torch.zeros(shape) for _ in range(config.n_layer)],
                   v=[torch.zeros(shape) for _ in range(config.n_layer)])


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_kv_cache_prefill_and_steps_match_the_full_forward(impl):
    math_model, sdpa_model = twins(SMALL, seed=3)
    model = math_model if impl == "math" else sdpa_model
    idx = torch.randint(0, SMALL.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(idx)
        cache = empty_cache(SMALL, 2)
        parts = [model(idx[:, :12], cache=cache)[0]]               # prefill
        parts.append(model(idx[:, 12:15], cache=cache)[0])         # a multi-token chunk
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(15, 20)]  # one by one
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_decoding_agrees_between_impls():
    math_model, sdpa_model = twins(SMALL, seed=4)
    idx = torch.randint(0, SMALL.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    outs = []
    with torch.no_grad():
        for m in (math_model, sdpa_model):
            cache = empty_cache(SMALL, 1)
            steps = [m(idx[:, :10], cache=cache)[0]]
            steps += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(10, 16)]
            outs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(SMALL)
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, SMALL.block_size + 1, dtype=torch.long))


def test_loss_equals_forward_loss_and_gradients():
    model = perturb(GPT(SMALL))
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, SMALL.vocab_size, (3, 24), generator=g)
    targets = torch.randint(0, SMALL.vocab_size, (3, 24), generator=g)
    targets[1, 4:9] = -1
    _, ref = model(idx, targets)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = model.loss(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-5, msg=n)
    n_valid = (targets != -1).sum()
    torch.testing.assert_close(model.loss(idx, targets, reduction="sum"), ref * n_valid,
                               atol=1e-4, rtol=1e-6)


def test_dropout_only_acts_in_training_mode():
    model = GPT(dataclasses.replace(SMALL, dropout=0.5))
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(idx)[0], model(idx)[0])
        model.eval()
        assert torch.equal(model(idx)[0], model(idx)[0])
