"""The fused LM-head cross-entropy (gptcore/model/loss.py) against plain logits +
F.cross_entropy: the same loss and gradients, whatever the chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptcore.model.loss import linear_cross_entropy

N, C, V = 75, 16, 300  # N is not a multiple of any chunk or group below


def _case(seed: int = 0, ignored: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).requires_grad_()
    w = (torch.randn(V, C, generator=g) * 0.5).requires_grad_()
    t = torch.randint(V, (N,), generator=g)
    if ignored:
        t[10:17] = -1
    return x, w, t


def _reference(x, w, t, softcap: float = 0.0, smoothing: float = 0.0):
    logits = x @ w.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, t, ignore_index=-1, reduction="sum", label_smoothing=smoothing)
    gx, gw = torch.autograd.grad(loss, (x, w))
    return loss.detach(), gx, gw


@pytest.mark.parametrize("chunk, group", [(16, 16), (16, 48), (32, 1000), (128, 512)])
@pytest.mark.parametrize("ignored", [True, False])
def test_fp32_matches_cross_entropy_for_any_chunking(chunk, group, ignored):
    x, w, t = _case(ignored=ignored)
    ref, ref_gx, ref_gw = _reference(x, w, t)
    loss = linear_cross_entropy(x, w, t, chunk_size=chunk, group_size=group)
    gx, gw = torch.autograd.grad(loss, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    if ignored:
        assert torch.all(gx[10:17] == 0)  # ignored rows get no gradient


@pytest.mark.parametrize("chunk, group", [(16, 16), (16, 48), (128, 512)])
def test_bf16_training_path_stays_close_to_fp32(chunk, group):
    """Under bf16 autocast the softmax writes bf16 probabilities; the loss comes from
    them. Loss within 0.1 % and gradients within 2 % (relative norm) of the exact fp32."""
    x, w, t = _case(seed=1)
    ref, ref_gx, ref_gw = _reference(x, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t, chunk_size=chunk, group_size=group)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert loss.dtype == torch.float32 and gx.dtype == gw.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    assert float((gx - ref_gx).norm() / ref_gx.norm()) < 0.02
    assert float((gw - ref_gw).norm() / ref_gw.norm()) < 0.02
    assert torch.all(gx[10:17] == 0)


def test_without_gradient_the_loss_is_exact_for_the_bf16_logits():
    """Evaluation (no grad): fp32 logsumexp over the bf16 matmul's logits."""
    x, w, t = _case(seed=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t, chunk_size=16)
    logits = (x.detach().bfloat16() @ w.detach().bfloat16().t()).float()
    ref = F.cross_entropy(logits, t, ignore_index=-1, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("chunk, group", [(16, 16), (32, 1000)])
def test_soft_capped_loss_and_gradients_match_cross_entropy_of_capped_logits(chunk, group):
    """With ``softcap`` the fused path's loss and gradients are those of
    cross_entropy(cap * tanh(logits / cap)): exact in fp32, close under bf16 autocast."""
    x, w, t = _case(seed=3)
    cap = 2.0  # logits reach ~8 here: the cap binds
    ref, ref_gx, ref_gw = _reference(x, w, t, softcap=cap)
    assert abs(ref.item() - _reference(x, w, t)[0].item()) > 1.0  # ...so the cap changes the loss
    loss = linear_cross_entropy(x, w, t, chunk_size=chunk, group_size=group, softcap=cap)
    gx, gw = torch.autograd.grad(loss, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, chunk_size=chunk, softcap=cap), ref,
                                   rtol=1e-6, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t, chunk_size=chunk, group_size=group, softcap=cap)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    assert float((gx - ref_gx).norm() / ref_gx.norm()) < 0.02
    assert float((gw - ref_gw).norm() / ref_gw.norm()) < 0.02


@pytest.mark.parametrize("cap", [0.0, 2.0])
@pytest.mark.parametrize("chunk, group", [(16, 16), (32, 1000)])
def test_label_smoothed_loss_and_gradients_match_cross_entropy(cap, chunk, group):
    """``smoothing`` is F.cross_entropy's ``label_smoothing`` (also through a soft cap):
    exact in fp32 with and without a gradient, close under bf16 autocast; ignored rows
    still get no gradient."""
    x, w, t = _case(seed=4)
    e = 0.1
    ref, ref_gx, ref_gw = _reference(x, w, t, softcap=cap, smoothing=e)
    assert abs(ref.item() - _reference(x, w, t, softcap=cap)[0].item()) > 1.0  # smoothing matters here
    loss = linear_cross_entropy(x, w, t, chunk_size=chunk, group_size=group, softcap=cap, smoothing=e)
    gx, gw = torch.autograd.grad(loss, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert torch.all(gx[10:17] == 0)
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(x, w, t, chunk_size=chunk, softcap=cap, smoothing=e), ref, rtol=1e-6, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t, chunk_size=chunk, group_size=group, softcap=cap, smoothing=e)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    assert float((gx - ref_gx).norm() / ref_gx.norm()) < 0.02
    assert float((gw - ref_gw).norm() / ref_gw.norm()) < 0.02
    assert torch.all(gx[10:17] == 0)
