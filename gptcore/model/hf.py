"""gptcore <-> Hugging Face transformers: which class expresses a model, its config.json,
and the weight mapping both ways (``hf_export.py`` writes a directory, ``hf_load.py`` reads one).

* Learned positions (GPT-2's layout) are ``GPT2LMHeadModel``. HF's GPT-2 stores its
  projections as ``Conv1D`` with weights shaped (in, out), the transpose of ``nn.Linear``'s
  (out, in); everything else maps one to one by name.
* Rotary positions are ``GPTNeoXForCausalLM`` with every dimension rotated, sequential
  residuals (gptcore's blocks are sequential pre-LN, NeoX's default is parallel) and the
  head tied to the embedding. gptcore rotates the pairs (i, i + head_size/2), as NeoX's
  ``rotate_half`` does, so only the fused QKV projection's rows are ordered differently.

Both carry biases and LayerNorm, and neither has QK-norm or a logit soft-cap: a model with
any of those is refused rather than exported as an approximation.
"""

from __future__ import annotations

import torch

from ..config import DROPOUT_SITES, GPTConfig
from ..errors import ConfigError, GptcoreError, invalid
from .gpt import GPT, ROPE_BASE


class HFError(GptcoreError, ValueError):
    """A model no Hugging Face class here expresses exactly, or a Hugging Face directory,
    config or state dict gptcore cannot read."""


GPT2, NEOX = "gpt2", "gpt_neox"  # config.json's model_type
CLASSES = {GPT2: "GPT2LMHeadModel", NEOX: "GPTNeoXForCausalLM"}
GPT2_EOT = 50256  # <|endoftext|> in GPT-2's BPE vocabulary
# gptcore's GELU is PyTorch's tanh approximation. transformers' "gelu_pytorch_tanh" is that
# very function; "gelu_new" writes the same formula out (within 3e-7) and is the name GPT-2's
# configs use, so GPT-2 keeps it. "gelu" in transformers is the exact erf GELU: another function.
_ACT_OUT = {GPT2: {"gelu": "gelu_new", "relu2": "relu2"}, NEOX: {"gelu": "gelu_pytorch_tanh", "relu2": "relu2"}}
_ACT_IN = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2"}
# A rotary model's block_size is in no weight; decoding allocates that many cache slots, so
# a config.json's value is bounded as checkpoint.MAX_ROPE_BLOCK bounds a checkpoint's.
MAX_POSITIONS = 1 << 20

# Parameters stored transposed by HF GPT-2's Conv1D.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_NEOX_NAMES = (("transformer.wte.", "gpt_neox.embed_in."), ("transformer.ln_f.", "gpt_neox.final_layer_norm."),
               ("transformer.h.", "gpt_neox.layers."), (".ln_1.", ".input_layernorm."),
               (".ln_2.", ".post_attention_layernorm."), (".attn.c_attn.", ".attention.query_key_value."),
               (".attn.c_proj.", ".attention.dense."), (".mlp.c_fc.", ".mlp.dense_h_to_4h."),
               (".mlp.c_proj.", ".mlp.dense_4h_to_h."))
# Names a state dict may carry beside the weights: the tied head (gptcore re-ties it; older
# NeoX files call it embed_out) and attention buffers of older transformers, which hold no weights.
_HEADS = {GPT2: ("lm_head.weight",), NEOX: ("lm_head.weight", "embed_out.weight")}
_BUFFERS = {GPT2: (".attn.bias", ".attn.masked_bias"),
            NEOX: (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")}


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D)


def architecture(config: GPTConfig) -> str:
    """The model_type that computes exactly what ``config`` does; HFError naming every
    setting neither class expresses."""
    bad = [f"{name}={getattr(config, name)}" for name, ok in (
        ("bias", config.bias), ("norm", config.norm == "layernorm"), ("qk_norm", not config.qk_norm),
        ("logit_softcap", not config.logit_softcap)) if not ok]
    if bad:
        raise HFError(f"Hugging Face export cannot express {', '.join(bad)} (GPT2LMHeadModel and GPTNeoXForCausalLM "
                      "have biases and LayerNorm, no QK-norm and no logit soft-cap); exportable: bias=True, "
                      "norm=layernorm, qk_norm=False, logit_softcap=0, with position=learned (GPT2LMHeadModel) "
                      "or rope (GPTNeoXForCausalLM), and mlp_activation gelu or relu2")
    return GPT2 if config.position == "learned" else NEOX


def hf_config_dict(config: GPTConfig, eot_id: int | None = None) -> dict:
    """config.json of the transformers class equivalent to ``config`` (see :func:`architecture`).

    ``eot_id`` (the end-of-text token, HF's bos/eos): default GPT-2's 50256 when the
    vocabulary holds it; a smaller (e.g. char-level) vocabulary has none unless given.
    """
    arch = architecture(config)
    if eot_id is None and config.vocab_size > GPT2_EOT:
        eot_id = GPT2_EOT
    if eot_id is not None and not 0 <= eot_id < config.vocab_size:
        raise HFError(f"eot_id={eot_id} is outside the vocabulary [0, {config.vocab_size})")
    act = _ACT_OUT[arch][config.mlp_activation]
    common = {"architectures": [CLASSES[arch]], "model_type": arch, "vocab_size": config.vocab_size,
              "initializer_range": 0.02, "bos_token_id": eot_id, "eos_token_id": eot_id,
              "tie_word_embeddings": True, "dtype": "float32"}
    if arch == GPT2:
        return {**common, "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
                "n_head": config.n_head, "n_inner": None, "activation_function": act,
                "resid_pdrop": config.dropout_p("resid"), "embd_pdrop": config.dropout_p("embed"),
                "attn_pdrop": config.dropout_p("attn"), "layer_norm_epsilon": config.layer_norm_eps}
    # NeoX applies hidden_dropout to the embeddings and to each block's outputs: gptcore's
    # "resid" rate stands for both (dropout only acts in training; the function is the same).
    return {**common, "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "intermediate_size": 4 * config.n_embd, "hidden_act": act,
            "max_position_embeddings": config.block_size, "layer_norm_eps": config.layer_norm_eps,
            "use_parallel_residual": False, "attention_bias": True,
            # transformers 5 reads rope_parameters; earlier versions rotary_pct and rotary_emb_base.
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE, "partial_rotary_factor": 1.0},
            "rotary_pct": 1.0, "rotary_emb_base": ROPE_BASE,
            "hidden_dropout": config.dropout_p("resid"), "attention_dropout": config.dropout_p("attn")}


# transformers' own defaults, so a config.json that omits a key means here what it means there.
_DEFAULTS = {
    GPT2: {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
           "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
           "layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
           "add_cross_attention": False, "tie_word_embeddings": True},
    NEOX: {"vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
           "intermediate_size": 24576, "hidden_act": "gelu", "attention_dropout": 0.0, "hidden_dropout": 0.0,
           "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "tie_word_embeddings": False,
           "use_parallel_residual": True, "attention_bias": True, "head_dim": None},
}
_SIZES = {GPT2: ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"),
          NEOX: ("vocab_size", "max_position_embeddings", "num_hidden_layers", "num_attention_heads", "hidden_size")}


def _rope(hf: dict) -> dict:
    """The rotary settings, wherever this config's transformers version kept them."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        rope = {"rope_type": rope}
    return {"rope_type": rope.get("rope_type", rope.get("type", "default")),
            "rope_theta": rope.get("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000))),
            "partial_rotary_factor": rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))}


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """The GPTConfig of a transformers config.json (model_type gpt2 or gpt_neox); HFError
    naming the first field gptcore cannot express."""
    arch = hf.get("model_type")
    if arch not in CLASSES:
        raise HFError(f"{where}: " + invalid("model_type", arch, "gpt2 | gpt_neox"))
    get = {**_DEFAULTS[arch], **hf}.get
    archs = hf.get("architectures")
    for key in _SIZES[arch]:  # first: the checks below compute with them
        if not isinstance(get(key), int) or isinstance(get(key), bool) or get(key) <= 0:
            raise HFError(f"{where}: " + invalid(key, get(key), "a positive integer"))
    vocab, block, n_layer, n_head, n_embd = (get(k) for k in _SIZES[arch])
    act_key = "activation_function" if arch == GPT2 else "hidden_act"
    width = (get("n_inner") or 4 * n_embd) if arch == GPT2 else get("intermediate_size")
    checks = [("architectures", archs in (None, [CLASSES[arch]]), f"[{CLASSES[arch]!r}]"),
              (act_key, isinstance(get(act_key), str) and get(act_key) in _ACT_IN,
               " | ".join(_ACT_IN) + " (gptcore's tanh GELU, or ReLU²)"),
              ("n_inner" if arch == GPT2 else "intermediate_size", width == 4 * n_embd,
               f"4 * hidden size = {4 * n_embd} (gptcore's MLP width)"),
              ("tie_word_embeddings", get("tie_word_embeddings") is True, "true (gptcore ties the head)")]
    if arch == GPT2:
        checks += [("scale_attn_weights", get("scale_attn_weights") is True, "true"),
                   ("scale_attn_by_inverse_layer_idx", get("scale_attn_by_inverse_layer_idx") is False, "false"),
                   ("add_cross_attention", get("add_cross_attention") is False, "false")]
    else:
        rope = _rope(hf)
        checks += [("use_parallel_residual", get("use_parallel_residual") is False, "false (sequential pre-LN)"),
                   ("attention_bias", get("attention_bias") is True, "true"),
                   ("head_dim", get("head_dim") in (None, n_embd / n_head), "hidden_size / num_attention_heads"),
                   ("rope_type", rope["rope_type"] == "default", "default (no scaling)"),
                   ("rope_theta", rope["rope_theta"] == ROPE_BASE, f"{ROPE_BASE:g}"),
                   ("partial_rotary_factor", rope["partial_rotary_factor"] == 1.0, "1.0 (every dimension rotated)"),
                   ("max_position_embeddings", block <= MAX_POSITIONS,
                    f"at most {MAX_POSITIONS:,}")]
        hf = {**hf, **rope}
    for key, ok, allowed in checks:
        if not ok:
            raise HFError(f"{where}: " + invalid(key, {**_DEFAULTS[arch], **hf}.get(key), allowed))
    sites = ({"embed": "embd_pdrop", "attn": "attn_pdrop", "resid": "resid_pdrop"} if arch == GPT2 else
             {"embed": "hidden_dropout", "attn": "attention_dropout", "resid": "hidden_dropout"})
    try:
        return GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         bias=True, layer_norm_eps=get("layer_norm_epsilon" if arch == GPT2 else "layer_norm_eps"),
                         position="learned" if arch == GPT2 else "rope", mlp_activation=_ACT_IN[get(act_key)],
                         **_dropout({site: get(key) for site, key in sites.items()}, sites, where))
    except ConfigError as exc:
        raise HFError(f"{where}: {exc}") from None


def _dropout(rates: dict, keys: dict, where: str) -> dict:
    """gptcore's one dropout rate and its sites from a rate per site."""
    on = {site: rate for site, rate in rates.items() if rate}
    if len({repr(r) for r in on.values()}) > 1:
        shown = ", ".join(sorted({f"{keys[s]}={r}" for s, r in on.items()}))
        raise HFError(f"{where}: dropout rates {shown} differ; allowed: one rate (gptcore has one dropout, "
                      "applied at chosen sites), or 0")
    if not on:
        return {"dropout": 0.0}
    return {"dropout": next(iter(on.values())), "dropout_at": "+".join(s for s in DROPOUT_SITES if s in on)}


def hf_name(name: str, arch: str) -> str:
    """A gptcore parameter's name in the transformers class of ``arch``."""
    if arch == NEOX:
        for ours, theirs in _NEOX_NAMES:
            name = name.replace(ours, theirs)
    return name


def _neox_qkv(t: torch.Tensor, n_head: int, to_neox: bool) -> torch.Tensor:
    """gptcore's c_attn rows are all heads' queries, then keys, then values; NeoX's
    query_key_value interleaves them per head (head 0: q k v, head 1: q k v, ...)."""
    hs = t.shape[0] // (3 * n_head)
    rows = (3, n_head, hs) if to_neox else (n_head, 3, hs)
    return t.reshape(*rows, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _convert(name: str, t: torch.Tensor, arch: str, n_head: int, to_hf: bool) -> torch.Tensor:
    """One tensor from gptcore's layout to the class's (or back); each direction undoes the other."""
    if arch == GPT2:
        return t.t() if _is_conv1d(name) else t
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        return _neox_qkv(t, n_head, to_neox=to_hf)
    return t


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under the names of its transformers class (tied head omitted)."""
    arch, n_head = architecture(model.config), model.config.n_head
    return {hf_name(name, arch): _convert(name, t.detach(), arch, n_head, to_hf=True).contiguous().clone()
            for name, t in model.state_dict().items() if name != "lm_head.weight"}  # HF re-ties the head


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> GPT:
    """Build a gptcore GPT from a GPT2LMHeadModel or GPTNeoXForCausalLM state dict (which
    one ``config`` says, as :func:`architecture` does)."""
    arch = architecture(config)
    # Built on the meta device: names and shapes are checked before anything is allocated
    # (a config.json's sizes are only allocated once the weights are known to hold them),
    # and no random init is spent on weights about to be overwritten.
    with torch.device("meta"):
        model = GPT(config)
    ours = {hf_name(k, arch): (k, v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    theirs = {k: v for k, v in state_dict.items() if not k.endswith(_BUFFERS[arch]) and k not in _HEADS[arch]}
    # gptcore always ties the LM head to the embedding; dropping a different head would
    # silently load another model.
    wte = hf_name("transformer.wte.weight", arch)
    for head in _HEADS[arch]:
        if head in state_dict and wte in theirs and not torch.equal(state_dict[head], theirs[wte]):
            raise HFError(f"{head} differs from {wte}; gptcore needs tied embeddings (tie_word_embeddings=True)")
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or unexpected:
        raise HFError(f"{CLASSES[arch]} state dict does not match config: missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}")
    for name, (ours_name, shape) in ours.items():
        expect = tuple(reversed(shape)) if arch == GPT2 and _is_conv1d(ours_name) else tuple(shape)
        if tuple(theirs[name].shape) != expect:
            raise HFError(f"{name}: shape {tuple(theirs[name].shape)} does not match the config's {expect}")
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty() gave each module its own Parameter
    converted = {k: _convert(k, theirs[name], arch, config.n_head, to_hf=False) for name, (k, _) in ours.items()}
    converted["lm_head.weight"] = converted["transformer.wte.weight"]
    model.load_state_dict(converted)
    return model
