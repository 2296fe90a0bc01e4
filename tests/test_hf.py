"""Parity with Hugging Face's GPT2LMHeadModel, both directions, random weights (nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gptcore.config import GPTConfig
from gptcore.model import GPT, export_hf, from_hf_state_dict, to_hf_state_dict
from gptcore.model.hf import _is_conv1d, config_from_hf

SHAPES = {  # n_layer, n_head, n_embd, n_positions, vocab_size
    "default": (4, 4, 128, 256, 50257),
    "gpt2-small": (12, 12, 768, 1024, 50257),
}
ATOL = 1e-4


def randomize_small_params(params, seed: int) -> None:
    """LayerNorm weights and all biases init to 1 / 0 in both libraries, which would let a
    swapped or transposed mapping of them pass unnoticed: give them random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if p.dim() == 1:
                noise = 0.1 * torch.randn(p.shape, generator=g)
                p.copy_(noise if name.endswith(".bias") else 1.0 + noise)


def make_hf(shape: str, seed: int = 0) -> GPT2LMHeadModel:
    n_layer, n_head, n_embd, n_positions, vocab_size = SHAPES[shape]
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(config).eval()
    randomize_small_params(hf.named_parameters(), seed)
    return hf


def make_ours(shape: str, seed: int = 0) -> GPT:
    n_layer, n_head, n_embd, n_positions, vocab_size = SHAPES[shape]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=n_positions,
                          vocab_size=vocab_size)).eval()
    randomize_small_params(model.named_parameters(), seed)
    return model


def max_logit_diff(ours: GPT, hf: GPT2LMHeadModel, seed: int) -> float:
    """Largest |logits| difference over two random batches (B=2, T=32); asserts <= ATOL."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for _ in range(2):
            idx = torch.randint(0, ours.config.vocab_size, (2, 32), generator=g)
            a, b = ours(idx)[0], hf(idx).logits
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
            worst = max(worst, (a - b).abs().max().item())
    return worst


def max_late_position_diff(ours: GPT, hf: GPT2LMHeadModel) -> float:
    """One full-context sequence: final hidden states at every position up to n_positions-1,
    and logits over the last 16 positions (the LM head on all 1024 would only cost time)."""
    T = ours.config.block_size
    idx = torch.randint(0, ours.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        h_ours = ours.hidden_states(idx)
        h_hf = hf.transformer(idx).last_hidden_state
        torch.testing.assert_close(h_ours, h_hf, atol=ATOL, rtol=0)
        a, b = ours.lm_head(h_ours[:, -16:]), hf.lm_head(h_hf[:, -16:])
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    return max((h_ours - h_hf).abs().max().item(), (a - b).abs().max().item())


@pytest.fixture(scope="module", params=list(SHAPES))
def imported(request) -> tuple[str, GPT2LMHeadModel, GPT]:
    """A random HF model and the gptcore model imported from its state dict."""
    hf = make_hf(request.param)
    ours = from_hf_state_dict(hf.state_dict(), config_from_hf(hf.config.to_dict())).eval()
    return request.param, hf, ours


def test_import_from_hf_gives_the_same_logits(imported):
    shape, hf, ours = imported
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_embd, ours.config.block_size,
            ours.config.vocab_size) == SHAPES[shape]
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    worst = max_logit_diff(ours, hf, seed=1)
    msg = f"\n[HF import parity, {shape}] max |logits diff| (B=2, T=32) = {worst:.3g}"
    if shape == "gpt2-small":
        msg += f"; positions 0..1023 (B=1): {max_late_position_diff(ours, hf):.3g}"
    print(msg)


def check_export(ours: GPT, directory) -> float:
    out = export_hf(ours, directory)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    # Every tensor arrived exactly (all of wpe, so every position is mapped), and the head
    # was re-tied to wte rather than left at a random init.
    theirs = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(theirs[name], tensor.t() if _is_conv1d(name) else tensor), name
    assert torch.equal(hf.lm_head.weight, ours.transformer.wte.weight)
    return max_logit_diff(ours, hf, seed=2)


def test_export_loads_in_transformers_with_the_same_logits(imported, tmp_path):
    shape, _, ours = imported
    worst = check_export(ours, tmp_path / "hf")
    print(f"\n[HF export parity, {shape}] max |logits diff| (B=2, T=32) = {worst:.3g}")


def test_export_of_a_freshly_initialised_model(tmp_path):
    worst = check_export(make_ours("default"), tmp_path / "hf")
    print(f"\n[HF export parity, fresh gptcore init, default] max |logits diff| = {worst:.3g}")


def test_hf_state_dict_round_trip_is_exact():
    hf = make_hf("default", seed=3)
    sd = hf.state_dict()
    back = to_hf_state_dict(from_hf_state_dict(sd, config_from_hf(hf.config.to_dict())))
    assert set(back) == set(sd) - {"lm_head.weight"}
    for name, tensor in back.items():
        assert torch.equal(tensor, sd[name]), name


def test_exported_config_round_trips_through_config_from_hf(tmp_path):
    config = GPTConfig(vocab_size=101, block_size=64, n_layer=3, n_head=2, n_embd=16,
                       layer_norm_eps=1e-6)
    out = export_hf(GPT(config), tmp_path / "hf")
    assert config_from_hf(json.loads((out / "config.json").read_text())) == config


def test_mismatched_state_dicts_are_refused_with_names():
    hf = make_hf("default")
    config = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    del sd["transformer.h.3.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing \['transformer.h.3.mlp.c_fc.bias'\]"):
        from_hf_state_dict(sd, config)
    with pytest.raises(ValueError, match=r"transformer.wpe.weight: shape \(256, 128\) .* \(128, 128\)"):
        from_hf_state_dict(hf.state_dict(), GPTConfig(block_size=128))
    untied = dict(hf.state_dict())
    untied["lm_head.weight"] = untied["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="tied"):
        from_hf_state_dict(untied, config)


@pytest.mark.parametrize("override, match", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"n_inner": 100}, "n_inner"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
])
def test_hf_configs_gptcore_cannot_represent_are_refused(override, match):
    hf = {**GPT2Config(n_layer=2, n_head=2, n_embd=16).to_dict(), **override}
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


def test_export_without_biases_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bias=True"):
        export_hf(GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bias=False)),
                  tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_exported_end_of_text_id_belongs_to_the_vocabulary(tmp_path):
    """GPT-2's 50256 only where it exists: a char-level export names its own end-of-text id."""
    small = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=66, block_size=8))
    cfg = json.loads((export_hf(small, tmp_path / "char") / "config.json").read_text())
    assert cfg["bos_token_id"] is None and cfg["eos_token_id"] is None
    cfg = json.loads((export_hf(small, tmp_path / "char-eot", eot_id=65) / "config.json").read_text())
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 65
    with pytest.raises(ValueError, match=r"eot_id=66 is outside the vocabulary \[0, 66\)"):
        export_hf(small, tmp_path / "bad", eot_id=66)
    assert not (tmp_path / "bad").exists()
    big = json.loads((export_hf(GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2)), tmp_path / "bpe")
                      / "config.json").read_text())
    assert big["bos_token_id"] == big["eos_token_id"] == 50256
