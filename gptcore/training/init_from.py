"""``train.init_from``: where training starts, from random weights or from an existing model.

    scratch                     random weights from train.seed (the default)
    <dir>                       a gptcore checkpoint directory (e.g. a copy of models/best)
    models:/gptcore@champion    a registered version, by alias or number (models:/gptcore/3)
    hf:<dir>                    a Hugging Face GPT-2 or GPT-NeoX directory (gptcore.model.load_hf)

The init model must *be* ``model.*``: params.yaml keeps describing the model that trains, so a
mismatch is an error that names each field and the ``-S`` settings that make it match. Its
tokenizer must be the data's, so every token id means what it meant in pretraining. Its
content digest joins the run's fingerprint (a resumed fine-tune continues the same fine-tune),
and its lineage (source, version, run, digest) is tagged on the MLflow run and the version
it registers.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..config import GPTConfig
from ..data.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer
from ..errors import CheckpointError, ConfigError
from ..init_source import ALLOWED, HF_PREFIX, REGISTRY_PREFIX, SCRATCH, char_vocab, local_path, read_json
from ..io import tree_digest
from ..model.hf import HFError
from ..model.hf_load import load_hf
from ..registry import fetch_checkpoint, resolve_version

# Fields that say how a model trains or runs, not what it computes: they may differ.
_NOT_ARCHITECTURE = ("attn_impl", "dropout", "dropout_at", "zero_init_proj")


@dataclass
class Init:
    """The weights training starts from and where they came from."""

    spec: str
    state: dict[str, torch.Tensor]
    digest: str
    tags: dict[str, str] = field(default_factory=dict)


def load_init(spec: str, model: GPTConfig, tokenizer: Tokenizer) -> Init | None:
    """The init weights ``spec`` names, checked against ``model`` and the data's
    ``tokenizer``; None for scratch. Every problem is one GptcoreError naming the fix."""
    if spec == SCRATCH:
        return None
    where = f"train.init_from={spec!r}"
    if spec.startswith(HF_PREFIX):
        directory = Path(local_path(spec))
        if not directory.is_dir():
            raise ConfigError(f"{where}: no such directory; allowed: {ALLOWED}")
        try:
            net = load_hf(directory)
        except HFError as exc:  # e.g. a pytorch_model.bin that would run code: say which setting
            raise HFError(f"{where}: {exc}") from None
        _check_hf_tokenizer(directory, tokenizer, where)
        tags = {"gptcore.init_kind": "hf", "gptcore.init_path": str(directory.resolve())}
        return _checked(spec, net, model, tokenizer, tree_digest(directory), tags, where)
    with tempfile.TemporaryDirectory(prefix="gptcore-init-") as tmp:
        directory = fetch_checkpoint(spec, tmp, what="train.init_from")  # its errors name the setting
        try:
            net, ckpt_tok, _ = load_checkpoint(directory)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        if not ckpt_tok.same_as(tokenizer):
            raise ConfigError(f"{where}: its tokenizer ({ckpt_tok.describe()}) is not the data's "
                              f"({tokenizer.describe()}); set tokenizer.kind={ckpt_tok.kind} and re-run tokenize "
                              "with this train.init_from, so token ids mean what they meant in pretraining")
        digest = _checkpoint_digest(directory)
        tags = {"gptcore.init_kind": "registry" if spec.startswith(REGISTRY_PREFIX) else "checkpoint"}
        if spec.startswith(REGISTRY_PREFIX):
            tags.update(resolve_version(spec))
        else:
            tags["gptcore.init_path"] = str(Path(spec).resolve())
        return _checked(spec, net, model, tokenizer, digest, tags, where)


def _checked(spec: str, net, model: GPTConfig, tokenizer: Tokenizer, digest: str, tags: dict,
             where: str) -> Init:
    theirs, ours = net.config.to_dict(), model.to_dict()
    differ = [f"{k}={ours[k]!r} (init: {theirs[k]!r})" for k in ours
              if k not in _NOT_ARCHITECTURE and ours[k] != theirs.get(k)]
    if differ:
        fix = " ".join(f"-S model.{k}={json.dumps(theirs[k])}" for k in ours
                       if k not in _NOT_ARCHITECTURE and ours[k] != theirs.get(k))
        raise ConfigError(f"{where}: model.* differs from the init model: {', '.join(differ)}; make params.yaml "
                          f"describe it (dvc exp run {fix})")
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"{where}: the data's tokenizer has {tokenizer.vocab_size} ids, the init model "
                          f"{model.vocab_size}")
    return Init(spec, net.state_dict(), digest, {"gptcore.init_from": spec, "gptcore.init_digest": digest, **tags})


def _checkpoint_digest(directory: Path) -> str:
    """A gptcore checkpoint's save_id is the digest of its content; older ones get one here."""
    try:
        save_id = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("save_id")
    except (OSError, ValueError, AttributeError):
        save_id = None
    return save_id if isinstance(save_id, str) and len(save_id) == 64 else tree_digest(directory)


def _check_hf_tokenizer(directory: Path, tokenizer: Tokenizer, where: str) -> None:
    """What the Hugging Face directory says about its tokenizer must be the data's. A
    directory with no tokenizer files (a bare ``save_pretrained`` of a model) is taken as
    GPT-2's vocabulary, which its vocab_size is checked against in :func:`_checked`."""
    vocab, merges, spec = (directory / n for n in ("vocab.json", "merges.txt", "tokenizer.json"))
    if vocab.is_file() and merges.is_file():
        if not isinstance(tokenizer, GPT2Tokenizer):
            raise ConfigError(f"{where}: a GPT-2 BPE model (vocab.json, merges.txt) but tokenizer.kind="
                              f"{tokenizer.kind}; set tokenizer.kind=gpt2")
        same = (read_json(vocab) == read_json(tokenizer.directory / "encoder.json")
                and _merges(merges) == _merges(tokenizer.directory / "vocab.bpe"))
        if not same:
            raise ConfigError(f"{where}: its vocab.json/merges.txt are not GPT-2's BPE; allowed: a model with "
                              "GPT-2's vocabulary (a model with a trained BPE fine-tunes from its gptcore checkpoint "
                              "or registry version, whose BPE the tokenize stage reuses)")
    elif spec.is_file():
        chars = char_vocab(spec)
        if chars is None or not isinstance(tokenizer, CharTokenizer) or chars != tokenizer.chars:
            raise ConfigError(f"{where}: its tokenizer.json is not the data's tokenizer ({tokenizer.describe()}); "
                              "allowed: the tokenizer the model was trained with (for char: the same characters)")
    elif not isinstance(tokenizer, GPT2Tokenizer):
        raise ConfigError(f"{where}: no tokenizer files, so GPT-2's vocabulary is assumed, but tokenizer.kind="
                          f"{tokenizer.kind}; set tokenizer.kind=gpt2")


def _merges(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#version")]
