"""Export to Hugging Face transformers and back, checked against transformers itself
(offline, tiny random models): the pipeline's default architecture (rotary + ReLU²) as
GPTNeoXForCausalLM and GPT-2's as GPT2LMHeadModel, with the same logits; the tokenizer
files AutoTokenizer reads; pipeline("text-generation") agreeing with ``gptcore generate``;
the ``gptcore export`` command; and ``load_hf`` reading what export and save_pretrained write,
never running a pickle."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer
from test_checkpoint import payloads
from test_hf import randomize_small_params
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    pipeline,
)

from gptcore import registry
from gptcore.checkpoint import MAX_ROPE_BLOCK, load_checkpoint, save_checkpoint
from gptcore.cli import main
from gptcore.config import GPTConfig, Params
from gptcore.data.tokenizer import GPT2Tokenizer
from gptcore.io import copy_dir
from gptcore.model import GPT, export_hf, load_hf
from gptcore.model.hf import MAX_POSITIONS, HFError

GPTCORE = Path(sys.executable).with_name("gptcore")  # the console script next to this Python
TOL = 1e-5
# The pipeline's model (params.yaml: rotary + ReLU²), GPT-2's, and the two crossings.
ARCHS = {
    "pipeline": ("pipeline", "GPTNeoXForCausalLM"),
    "gpt2": ({}, "GPT2LMHeadModel"),
    "rope+gelu": ({"position": "rope"}, "GPTNeoXForCausalLM"),
    "learned+relu2": ({"mlp_activation": "relu2"}, "GPT2LMHeadModel"),
}
CHARS = string.ascii_letters + " \n.,:;!?'-"


def config(arch: str, vocab_size: int = 67, block_size: int = 32) -> GPTConfig:
    variant, _ = ARCHS[arch]
    base = Params().model if variant == "pipeline" else GPTConfig(**variant)
    return dataclasses.replace(base, vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_embd=32)


def tiny(arch: str, seed: int = 0, **sizes) -> GPT:
    """Weights far from the init (unit-ish logits would hide a mapping error), every norm
    gain and bias random too."""
    torch.manual_seed(seed)
    model = GPT(config(arch, **sizes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    randomize_small_params(model.named_parameters(), seed)
    return model


def random_ids(model: GPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, model.config.block_size),
                         generator=torch.Generator().manual_seed(seed))


def logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0] if isinstance(model, GPT) else model(idx).logits


def greedy_checkpoint(directory: Path, arch: str, seed: int = 0) -> Path:
    """conftest.never_ending_checkpoint's idea in any architecture: a tiny random char-level
    model whose end-of-text logit is 0 while the largest is positive, so a greedy completion
    runs to its token limit (and, with these weights, does not repeat one character)."""
    tok = char_tokenizer(CHARS)
    model = tiny(arch, seed, vocab_size=tok.vocab_size)
    with torch.no_grad():
        model.transformer.wte.weight[tok.eot_id] = 0.0
    return save_checkpoint(directory, model, tok)


# ------------------------------------------------------------------ the model in transformers

@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_loads_as_its_class_with_the_same_logits(arch, tmp_path):
    model = tiny(arch)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf", eot_id=66)).eval()
    assert type(hf).__name__ == ARCHS[arch][1] and hf.dtype == torch.float32
    assert torch.equal(hf.get_output_embeddings().weight, model.transformer.wte.weight)  # re-tied, not random
    idx = random_ids(model)
    ours, theirs = logits(model, idx), logits(hf, idx)
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)
    print(f"\n[HF export, {arch}] max |logits diff| over every position = {(theirs - ours).abs().max():.3g}")


def test_the_pipelines_model_is_gpt_neox_with_gptcores_equations(tmp_path):
    model = tiny("pipeline")
    written = json.loads((export_hf(model, tmp_path / "hf", eot_id=66) / "config.json").read_text())
    c = model.config
    expected = {
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "rotary_pct": 1.0,
        "rotary_emb_base": 10000.0, "use_parallel_residual": False, "hidden_act": "relu2", "attention_bias": True,
        "tie_word_embeddings": True, "layer_norm_eps": c.layer_norm_eps, "max_position_embeddings": c.block_size,
        "intermediate_size": 4 * c.n_embd, "hidden_size": c.n_embd, "num_attention_heads": c.n_head,
        "num_hidden_layers": c.n_layer, "vocab_size": c.vocab_size, "bos_token_id": 66, "eos_token_id": 66,
        "hidden_dropout": 0.0, "attention_dropout": 0.0}
    assert {k: written[k] for k in expected} == expected
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    assert MAX_POSITIONS == MAX_ROPE_BLOCK  # load_hf bounds a rotary block_size as checkpoints do
    # The signature before tokenizers, export_hf(model, directory, eot_id), still works.
    assert json.loads((export_hf(model, tmp_path / "old", 65) / "config.json").read_text())["eos_token_id"] == 65
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.rope_parameters["partial_rotary_factor"] == 1.0 and not hf.config.use_parallel_residual


@pytest.mark.parametrize("arch", ["pipeline", "gpt2"])
def test_export_then_load_hf_is_the_same_model(arch, tmp_path):
    model = tiny(arch)
    back = load_hf(export_hf(model, tmp_path / "hf"))
    assert back.config == dataclasses.replace(model.config, attn_impl="sdpa", zero_init_proj=False)
    assert back.lm_head.weight is back.transformer.wte.weight and not back.training
    ours = model.state_dict()
    assert all(torch.equal(t, ours[name]) for name, t in back.state_dict().items())
    idx = random_ids(model)
    assert torch.equal(logits(back, idx), logits(model, idx))


HF_MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=67, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=66, eos_token_id=66)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=67, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        hidden_act="relu2", max_position_embeddings=32, use_parallel_residual=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        bos_token_id=66, eos_token_id=66)),
}


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_load_hf_reads_transformers_own_save_pretrained(kind, layout, tmp_path):
    torch.manual_seed(3)
    hf = HF_MODELS[kind]().eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    randomize_small_params(hf.named_parameters(), 3)
    if layout == "bin":  # what save_pretrained wrote before safetensors
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if layout == "sharded" else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == (layout == "sharded")
    ours = load_hf(tmp_path)
    assert ours.config.position == ("learned" if kind == "gpt2" else "rope")
    idx = random_ids(ours)
    torch.testing.assert_close(logits(ours, idx), logits(hf, idx), atol=TOL, rtol=0)


def test_a_pickle_in_pytorch_model_bin_is_refused_and_never_run(tmp_path):
    out = export_hf(tiny("gpt2"), tmp_path / "hf")
    (out / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    for payload in payloads(marker):
        torch.save({"transformer.wte.weight": payload}, out / "pytorch_model.bin")
        with pytest.raises(HFError, match=r"pytorch_model.bin: refused to load: .* could run code \(it references "):
            load_hf(out)
        assert not marker.exists()
    torch.save({"transformer.wte.weight": 3}, out / "pytorch_model.bin")  # a weights-only pickle, not a tensor
    with pytest.raises(HFError, match=r"entry 'transformer.wte.weight' holds a int; allowed: a mapping of names"):
        load_hf(out)


@pytest.mark.parametrize("arch, change, message", [
    ("pipeline", {"use_parallel_residual": True}, "use_parallel_residual=True is invalid; allowed: false"),
    ("pipeline", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
     "partial_rotary_factor=0.25 is invalid; allowed: 1.0"),
    ("pipeline", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "rope_theta=500000.0 is invalid"),
    ("pipeline", {"rope_parameters": None, "rotary_pct": 0.25}, "partial_rotary_factor=0.25 is invalid"),
    ("pipeline", {"hidden_act": "gelu"}, "hidden_act='gelu' is invalid; allowed: gelu_new | gelu_pytorch_tanh"),
    ("pipeline", {"tie_word_embeddings": False}, "tie_word_embeddings=False is invalid"),
    ("pipeline", {"intermediate_size": 100}, "intermediate_size=100 is invalid; allowed: 4 * hidden size = 128"),
    ("pipeline", {"hidden_dropout": 0.1, "attention_dropout": 0.2}, "dropout rates attention_dropout=0.2, "),
    ("gpt2", {"model_type": "llama"}, "model_type='llama' is invalid; allowed: gpt2 | gpt_neox"),
    ("gpt2", {"activation_function": "relu"}, "activation_function='relu' is invalid"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is invalid"),
    ("gpt2", {"n_layer": 3}, "missing ['transformer.h.2.attn.c_attn.bias'"),
])
def test_load_hf_names_what_gptcore_cannot_express(arch, change, message, tmp_path):
    out = export_hf(tiny(arch), tmp_path / "hf")
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(HFError, match=re.escape(message)) as refused:
        load_hf(out)
    assert "\n" not in str(refused.value) and str(out) in str(refused.value)


def test_load_hf_refuses_missing_weights_and_shards_outside_the_directory(tmp_path):
    out = export_hf(tiny("gpt2"), tmp_path / "hf")
    (out / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(HFError, match="no weights; allowed: model.safetensors, pytorch_model.bin"):
        load_hf(out)
    index = {"weight_map": {"transformer.wte.weight": "../elsewhere.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFError, match=r"shard '../elsewhere.safetensors' is not a file name"):
        load_hf(out)
    with pytest.raises(HFError, match="no such directory"):
        load_hf(tmp_path / "nowhere")


# ------------------------------------------------------------------ tokenizers

def test_gpt2_bpe_tokenizer_files_encode_like_gptcore(mirror_dir, tmp_path):
    tok = GPT2Tokenizer(mirror_dir)
    out = export_hf(GPT(config("pipeline", vocab_size=tok.vocab_size)), tmp_path / "hf", tok)
    assert (out / "vocab.json").read_bytes() == (mirror_dir / "encoder.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (mirror_dir / "vocab.bpe").read_bytes()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eot_id == 50256
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == tok.eot_id
    text = (mirror_dir / "input.txt").read_text()[:20000] + " héllo wörld 😀  \n\n \tdone.  "
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text) and hf_tok.decode(ids) == text


def test_char_tokenizer_json_maps_each_character_to_gptcores_id(tmp_path):
    tok = char_tokenizer(CHARS + "éö")
    out = export_hf(GPT(config("pipeline", vocab_size=tok.vocab_size)), tmp_path / "hf", tok)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token_id == tok.eot_id and hf_tok.eos_token == "<|endoftext|>"
    text = "Hello, wörld!\n\nIt's  é -- done. \n"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text) and hf_tok.decode(ids) == text
    assert hf_tok.decode([*ids, tok.eot_id], skip_special_tokens=True) == text
    assert hf_tok("a#b")["input_ids"] == tok.encode("ab")  # no id for '#': dropped (gptcore refuses the text)
    with pytest.raises(HFError, match="differs from the tokenizer's end-of-text id"):
        export_hf(GPT(config("pipeline", vocab_size=tok.vocab_size)), tmp_path / "other", tok, eot_id=0)


# ------------------------------------------------------------------ the command and pipeline()

@pytest.mark.parametrize("arch", ["pipeline", "gpt2"])
def test_pipeline_greedy_text_equals_gptcore_generate(arch, tmp_path):
    ckpt = greedy_checkpoint(tmp_path / "ckpt", arch)
    prompt, n = "ROMEO:", 24
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    exported = subprocess.run([str(GPTCORE), "export", str(ckpt), str(tmp_path / "hf")], capture_output=True,
                              text=True, env=env, timeout=180)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == f"exported {ckpt} to {tmp_path / 'hf'} as {ARCHS[arch][1]} (tokenizer: char, 63 ids)\n"
    generated = subprocess.run([str(GPTCORE), "generate", "--checkpoint", str(ckpt), "--prompt", prompt,
                                "--temperature", "0", "--max-new-tokens", str(n)], capture_output=True, text=True,
                               env=env, timeout=180)
    assert generated.returncode == 0, generated.stderr
    ours = generated.stdout.removesuffix("\n")
    # The model never drew end-of-text, and its text varies: a wrong position or cache shows.
    assert len(ours) == len(prompt) + n and len(set(ours[len(prompt):])) > 5
    generate = pipeline("text-generation", model=str(tmp_path / "hf"))
    theirs = generate(prompt, do_sample=False, max_new_tokens=n)[0]["generated_text"]
    assert theirs == ours


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_command_errors_are_one_line(tmp_path, capsys):
    ckpt = greedy_checkpoint(tmp_path / "ckpt", "pipeline")
    model, tok, _ = load_checkpoint(ckpt)
    save_checkpoint(tmp_path / "qk", GPT(dataclasses.replace(model.config, qk_norm=True)), tok)
    code, _, err = run_cli(capsys, tmp_path / "qk", tmp_path / "out")
    assert (code, err.count("\n")) == (2, 1) and "cannot express qk_norm=True" in err
    assert not (tmp_path / "out").exists()

    code, _, err = run_cli(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert (code, err.count("\n")) == (2, 1) and "no such checkpoint directory; allowed: a checkpoint" in err

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, ckpt, tmp_path / "out")
    assert (code, err.count("\n")) == (2, 1) and "exists and is not empty" in err and "--force" in err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    code, out, _ = run_cli(capsys, ckpt, tmp_path / "out", "--force")
    assert code == 0 and "as GPTNeoXForCausalLM" in out and not (tmp_path / "out" / "notes.txt").exists()

    code, _, err = run_cli(capsys, ckpt, tmp_path / "ckpt", "--force")  # would delete the checkpoint
    assert (code, err.count("\n")) == (2, 1) and "overlaps SOURCE" in err
    code, _, err = run_cli(capsys, ckpt, tmp_path / "out", "--format", "gguf")
    assert (code, err.count("\n")) == (2, 1) and "--format='gguf' is invalid; allowed: hf" in err
    assert load_checkpoint(ckpt)[0].config == model.config  # untouched


def test_export_takes_a_run_id_or_a_model_uri_as_generate_does(tmp_path, capsys, monkeypatch):
    """The MLflow sources go through the registry's downloads (tested with a real store in
    test_registry.py), here stood in for by a copy of a checkpoint."""
    ckpt = greedy_checkpoint(tmp_path / "ckpt", "pipeline")
    fetched = []

    def stand_in(kind: str):
        def download(source: str, dst: str, *_what: str) -> Path:
            fetched.append((kind, source))
            return copy_dir(ckpt, Path(dst) / "checkpoint")
        return download

    monkeypatch.setattr(registry, "download_run_model", stand_in("run"))
    monkeypatch.setattr(registry, "download_model", stand_in("model"))
    run_id = "0123456789abcdef0123456789abcdef"
    for source in (run_id, "models:/gptcore@champion"):
        code, out, err = run_cli(capsys, source, tmp_path / source.replace(":/", "-"))
        assert code == 0 and out.startswith(f"exported {source} to ") and "GPTNeoXForCausalLM" in out, err
    assert fetched == [("run", run_id), ("model", "models:/gptcore@champion")]
    model = load_checkpoint(ckpt)[0]
    idx = random_ids(model)
    assert torch.equal(logits(load_hf(tmp_path / run_id), idx), logits(model, idx))
