"""GPT-2 weights in Hugging Face layout <-> gptcore.

HF's GPT-2 stores its projections as ``Conv1D`` with weights shaped (in, out), the
transpose of ``nn.Linear``'s (out, in); everything else maps one to one by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import GPTConfig
from ..io import atomic_dir
from .gpt import GPT

# Parameters stored transposed by HF's Conv1D.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under HF GPT2LMHeadModel names (tied head omitted)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight; HF re-ties on load
        t = tensor.detach()
        out[name] = (t.t() if _is_conv1d(name) else t).contiguous().clone()
    return out


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> GPT:
    """Build a gptcore GPT from a GPT2LMHeadModel state dict."""
    # Built on the meta device: a random init of weights about to be overwritten only costs
    # time (seconds at GPT-2 small). to_empty() gives each module its own new Parameter,
    # so the head is re-tied afterwards.
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight
    ours = model.state_dict()
    expected = {k for k in ours if k != "lm_head.weight"}
    # Older HF versions carry non-parameter attention buffers; they hold no weights.
    theirs = {k: v for k, v in state_dict.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    # gptcore always ties the LM head to wte; dropping a different head would silently
    # load another model.
    head, wte = state_dict.get("lm_head.weight"), theirs.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise ValueError("lm_head.weight differs from transformer.wte.weight; gptcore needs "
                         "tied embeddings (tie_word_embeddings=True)")
    missing, unexpected = sorted(expected - set(theirs)), sorted(set(theirs) - expected)
    if missing or unexpected:
        raise ValueError(f"GPT-2 state dict does not match config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    converted = {}
    for name in expected:
        t = theirs[name]
        t = t.t() if _is_conv1d(name) else t
        if t.shape != ours[name].shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the config's "
                             f"{tuple(ours[name].shape)}")
        converted[name] = t
    converted["lm_head.weight"] = converted["transformer.wte.weight"]
    model.load_state_dict(converted)
    return model


GPT2_EOT = 50256  # <|endoftext|> in GPT-2's BPE vocabulary


def hf_config_dict(config: GPTConfig, eot_id: int | None = None) -> dict:
    """A GPT2Config as JSON, equivalent to ``config``.

    ``eot_id`` (the end-of-text token, HF's bos/eos): default GPT-2's 50256 when the
    vocabulary holds it; a smaller (e.g. char-level) vocabulary has none unless given.
    """
    if eot_id is None and config.vocab_size > GPT2_EOT:
        eot_id = GPT2_EOT
    if eot_id is not None and not 0 <= eot_id < config.vocab_size:
        raise ValueError(f"eot_id={eot_id} is outside the vocabulary [0, {config.vocab_size})")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout_p("resid"),
        "embd_pdrop": config.dropout_p("embed"),
        "attn_pdrop": config.dropout_p("attn"),
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": True,
    }


def export_hf(model: GPT, directory: str | Path, eot_id: int | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads.

    ``eot_id``: the tokenizer's end-of-text id (``tokenizer.eot_id``); see :func:`hf_config_dict`."""
    if not model.config.bias:
        raise ValueError("GPT-2 layout needs bias=True")
    # GPTConfig's defaults are GPT-2's choices; zero_init_proj only changes where training
    # started, so such a model exports.
    gpt2, c = GPTConfig(), model.config
    names = ("position", "qk_norm", "mlp_activation", "norm", "logit_softcap")
    beyond = [f"{n}={getattr(c, n)}" for n in names if getattr(c, n) != getattr(gpt2, n)]
    if beyond:
        raise ValueError(f"GPT-2's layout (GPT2LMHeadModel) cannot express {', '.join(beyond)}; only a model "
                         f"with {', '.join(f'{n}={getattr(gpt2, n)}' for n in names)} exports")
    with atomic_dir(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model.config, eot_id), indent=2))
        save_file(to_hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(directory)
