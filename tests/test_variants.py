"""Architecture variants (``model.position``, ``qk_norm``, ``mlp_activation``, ``norm``,
``zero_init_proj``): sizes, the equations they change, and that every path the default
model keeps (math == sdpa, causality, the KV cache, checkpoints) holds for them too. The
fast decoder with each variant is in test_generate.py, exact resume in test_train.py."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import char_tokenizer
from test_model import empty_cache, twins

from gptcore.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gptcore.config import GPTConfig
from gptcore.errors import ConfigError
from gptcore.model import GPT, KVCache, export_hf
from gptcore.model.decode import CachedDecoder
from gptcore.model.gpt import apply_rope, rope_angles

SMALL = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
VARIANTS = {
    "rope": dict(position="rope"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp_activation="relu2"),
    "rmsnorm": dict(norm="rmsnorm"),
    "softcap": dict(logit_softcap=1.0),  # a low cap, so that small test logits feel it
    "all": dict(position="rope", qk_norm=True, mlp_activation="relu2", norm="rmsnorm", zero_init_proj=True,
                logit_softcap=1.0),
}


def variant(name: str, base: GPTConfig = SMALL) -> GPTConfig:
    return dataclasses.replace(base, **VARIANTS[name])


def nonzero_projections(model: GPT, seed: int = 1) -> GPT:
    """zero_init_proj starts the blocks as the identity, which would hide an attention bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_parameter_counts_stay_within_the_reference():
    counts = {name: GPT(variant(name, GPTConfig())).num_parameters() for name in VARIANTS}
    assert GPT(GPTConfig()).num_parameters() == 7_259_008
    # rope drops wpe (256 x 128); RMSNorm has no bias (9 norms x 128); the rest add nothing.
    assert counts == {"rope": 7_259_008 - 32_768, "qk_norm": 7_259_008, "relu2": 7_259_008,
                      "rmsnorm": 7_259_008 - 1_152, "softcap": 7_259_008, "all": 7_259_008 - 32_768 - 1_152}


def test_defaults_are_gpt2_and_each_variant_changes_the_function():
    assert "wpe" in GPT(SMALL).transformer
    assert "wpe" not in GPT(variant("rope")).transformer
    idx = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base, _ = nonzero_projections(GPT(SMALL)).eval()(idx)
    for name in VARIANTS:
        torch.manual_seed(0)
        out, _ = nonzero_projections(GPT(variant(name))).eval()(idx)
        assert (out - base).abs().max() > 1e-4, name


def test_rotary_scores_depend_only_on_the_distance():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=g).unbind(0)

    def score(m: int, n: int) -> float:
        (cq, sq), (ck, sk) = rope_angles(torch.tensor(m), 16), rope_angles(torch.tensor(n), 16)
        return float(apply_rope(q, cq, sq) @ apply_rope(k, ck, sk))

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) == pytest.approx(score(4, 0), abs=1e-4)
    assert max(abs(score(7, 3) - score(7, n)) for n in range(7)) > 0.1  # ...and the distance does matter
    assert float(apply_rope(q, *rope_angles(torch.tensor(0), 16)) @ k) == pytest.approx(float(q @ k), abs=1e-6)


def test_zero_init_proj_starts_every_block_as_the_identity():
    model = GPT(dataclasses.replace(SMALL, zero_init_proj=True, dropout=0.0)).eval()
    assert all(p.abs().max() == 0 for n, p in model.named_parameters() if n.endswith("c_proj.weight"))
    idx = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(1))
    tr = model.transformer
    expect = tr.ln_f(tr.wte(idx) + tr.wpe(torch.arange(8)))  # biases start at zero too
    torch.testing.assert_close(model.hidden_states(idx), expect)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_math_and_sdpa_agree_with_each_variant(name):
    math_model, sdpa_model = (nonzero_projections(m) for m in twins(variant(name), seed=2))
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    outs = []
    for m in (math_model, sdpa_model):
        m.zero_grad()
        logits, loss = m(idx, targets)
        loss.backward()
        outs.append((logits, {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=0)
    for n, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_is_causal(name):
    torch.manual_seed(4)
    model = nonzero_projections(GPT(variant(name))).eval()
    idx = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base, _ = model(idx)
        changed = idx.clone()
        changed[:, 9:] = (changed[:, 9:] + 1) % 97
        out, _ = model(changed)
    torch.testing.assert_close(out[:, :9], base[:, :9], atol=1e-6, rtol=0)
    assert (out[:, 9:] - base[:, 9:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_equals_the_full_forward_with_each_variant(name):
    torch.manual_seed(5)
    config = variant(name)
    model = nonzero_projections(GPT(config)).eval()
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = model(idx)
        cache: KVCache = empty_cache(config, 2)
        parts = [model(idx[:, :12], cache=cache)[0], model(idx[:, 12:15], cache=cache)[0]]
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(15, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_checkpoints_round_trip_every_variant(tmp_path):
    tok = char_tokenizer("hello world, a small corpus of text\n")
    config = dataclasses.replace(variant("all"), vocab_size=tok.vocab_size)
    torch.manual_seed(7)
    model = nonzero_projections(GPT(config)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == config
    idx = torch.randint(0, tok.vocab_size, (1, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    # No weight holds a rotary model's block_size: a corrupt config.json is bounded instead
    # of allocating its KV caches.
    cfg_path = tmp_path / "ckpt" / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["model"]["block_size"] = 10 ** 12
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"block_size=1000000000000 \(position: rope; at most 1,048,576\)"):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("name, shown", [("qk_norm", "qk_norm=True"), ("rmsnorm", "norm=rmsnorm"),
                                         ("softcap", "logit_softcap=1.0"),
                                         ("all", "norm=rmsnorm, qk_norm=True, logit_softcap=1.0")])
def test_hf_export_refuses_what_no_hf_class_computes(tmp_path, name, shown):
    with pytest.raises(ValueError, match=f"cannot express {re.escape(shown)} ") as refused:
        export_hf(GPT(variant(name)), tmp_path / "hf")
    assert "\n" not in str(refused.value)  # one line, naming every offending setting
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name, cls", [("rope", "GPTNeoXForCausalLM"), ("relu2", "GPT2LMHeadModel")])
def test_hf_export_of_the_variants_an_hf_class_computes(tmp_path, name, cls):
    """Rotary models are GPT-NeoX, ReLU² is an activation both classes have (test_export.py
    checks the logits); zero-initialised projections only change the start: such a model exports."""
    config = json.loads((export_hf(GPT(variant(name)), tmp_path / "hf") / "config.json").read_text())
    assert config["architectures"] == [cls]
    config = json.loads((export_hf(GPT(dataclasses.replace(SMALL, zero_init_proj=True)), tmp_path / "ok")
                         / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]


@pytest.mark.parametrize("field, value, message", [
    ("position", "alibi", "position='alibi' is invalid; allowed: learned | rope"),
    ("mlp_activation", "swiglu", "mlp_activation='swiglu' is invalid; allowed: gelu | relu2"),
    ("norm", "batchnorm", "norm='batchnorm' is invalid; allowed: layernorm | rmsnorm"),
    ("qk_norm", "yes", "qk_norm must be true or false, got 'yes'"),
    ("zero_init_proj", 1, "zero_init_proj must be true or false, got 1"),
    ("logit_softcap", -1.0, "logit_softcap=-1.0 is invalid; allowed: a number >= 0 (0 = off)")])
def test_bad_variant_values_name_what_is_allowed(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GPTConfig.from_dict({field: value})


def test_rope_needs_an_even_head_size():
    with pytest.raises(ConfigError, match="even with position: rope"):
        GPTConfig(n_embd=12, n_head=4, position="rope")
    GPTConfig(n_embd=12, n_head=4)  # learned positions take any head size


def test_soft_capped_logits_stay_within_the_cap_in_every_path():
    torch.manual_seed(8)
    model = nonzero_projections(GPT(dataclasses.replace(SMALL, logit_softcap=0.05))).eval()
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(8))
    targets = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits, loss = model(idx, targets)
        raw = model.lm_head(model.hidden_states(idx))
    assert logits.abs().max() <= 0.05 < raw.abs().max()  # the cap binds here
    torch.testing.assert_close(logits, 0.05 * torch.tanh(raw / 0.05))
    # The fused loss (training, evaluation) sees the same capped logits.
    torch.testing.assert_close(model(idx, targets, return_logits=False)[1], loss, rtol=1e-5, atol=1e-6)


def test_a_soft_capped_model_takes_the_exact_head_and_keeps_the_exact_top_k():
    """tanh's saturation could make an id a screen left out equal, once capped, to the
    top-th logit, so a capped model is never screened, even when asked to be: its top-k
    are exactly the full head's, capped."""
    torch.manual_seed(10)
    model = GPT(dataclasses.replace(SMALL, vocab_size=4000, logit_softcap=3.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    seqs = torch.randint(0, 4000, (2, 8), generator=torch.Generator().manual_seed(10)).tolist()
    screened, full = CachedDecoder(model, max_rows=2, screen=True), CachedDecoder(model, max_rows=2)
    for slot in range(2):
        screened.prefill(slot, seqs[slot][:5], 5), full.prefill(slot, seqs[slot][:5])
    got, ref = screened.step([seqs[0][5], seqs[1][5]], 5), full.step([seqs[0][5], seqs[1][5]])
    assert ref.abs().max() <= 3.0 and screened._screens == 0
    for ids, values, r in zip(got.ids, got.values, ref):
        assert ids.tolist() == r.topk(5).indices.tolist()
        torch.testing.assert_close(values, r[ids], atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", ["embed+attn+resid", "resid", "attn+embed"])
def test_dropout_applies_only_at_the_named_sites(value, tmp_path):
    model = GPT(dataclasses.replace(SMALL, dropout=0.3, dropout_at=value))
    sites = set(value.split("+"))
    assert model.transformer.drop.p == (0.3 if "embed" in sites else 0.0)
    for block in model.transformer.h:
        assert block.attn.dropout == block.attn.attn_dropout.p == (0.3 if "attn" in sites else 0.0)
        assert block.attn.resid_dropout.p == block.mlp.dropout.p == (0.3 if "resid" in sites else 0.0)
    # Dropout really runs at the sites that are on: training mode differs from eval mode.
    x = torch.randint(0, SMALL.vocab_size, (2, 8))
    torch.manual_seed(0)
    assert not torch.equal(model.train()(x)[0], model.eval()(x)[0])
    config = json.loads((export_hf(GPT(dataclasses.replace(SMALL, dropout=0.3, dropout_at=value)),
                                   tmp_path / "hf") / "config.json").read_text())
    assert (config["embd_pdrop"], config["attn_pdrop"], config["resid_pdrop"]) == tuple(
        0.3 if s in sites else 0.0 for s in ("embed", "attn", "resid"))


@pytest.mark.parametrize("value", ["", "resid+resid", "mlp", "embed + attn", "embed,attn"])
def test_bad_dropout_sites_name_what_is_allowed(value):
    with pytest.raises(ConfigError, match=r"dropout_at=.* is invalid; allowed: sites joined by '\+', each at "
                                          r"most once, among embed, attn, resid"):
        GPTConfig.from_dict({"dropout_at": value})
    with pytest.raises(ConfigError, match=re.escape("dropout_at must be a string, got ['resid']")):
        GPTConfig.from_dict({"dropout_at": ["resid"]})  # YAML's list form: the params.yaml comment says "+"
