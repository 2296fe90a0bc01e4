"""Write a gptcore model (and its tokenizer) as a Hugging Face transformers directory.

``AutoModelForCausalLM``, ``AutoTokenizer`` and ``pipeline("text-generation")`` load it
offline. Every file is plain JSON or safetensors written here: gptcore imports neither
``transformers`` nor ``tokenizers`` (they only read what this writes).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..data.tokenizer import EOT_TEXT, GPT2_FILES, Tokenizer, _read_verified, byte_chars
from ..io import atomic_dir
from .gpt import GPT
from .hf import HFError, hf_config_dict, to_hf_state_dict


def export_hf(model: GPT, directory: str | Path, tokenizer: Tokenizer | None = None,
              eot_id: int | None = None) -> Path:
    """Atomically write ``directory``: config.json + model.safetensors for GPT2LMHeadModel
    (learned positions) or GPTNeoXForCausalLM (rotary), generation_config.json, and with a
    ``tokenizer`` its files for AutoTokenizer. A model neither class computes exactly is
    refused (HFError, one line naming the settings) before anything is written.

    ``eot_id``: the end-of-text id (HF's bos/eos); the tokenizer's when one is given,
    otherwise see :func:`gptcore.model.hf.hf_config_dict`."""
    if isinstance(tokenizer, int) and not isinstance(tokenizer, bool):
        tokenizer, eot_id = None, tokenizer  # export_hf(model, directory, eot_id): the signature before tokenizers
    if tokenizer is not None:
        if eot_id is not None and eot_id != tokenizer.eot_id:
            raise HFError(f"eot_id={eot_id} differs from the tokenizer's end-of-text id {tokenizer.eot_id}; "
                          "allowed: the tokenizer's, or leave eot_id out")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise HFError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size}; allowed: the tokenizer the model was trained with")
        eot_id = tokenizer.eot_id
    config = hf_config_dict(model.config, eot_id)
    files = tokenizer_files(tokenizer, model.config.block_size) if tokenizer is not None else {}
    # The generation defaults a checkpoint implies: stop at end-of-text, and pad batches with
    # it (a model without a pad token otherwise makes transformers pick one, with a warning).
    # Nothing else: sampling stays off unless the caller asks, as transformers' default.
    eot = config["eos_token_id"]
    files["generation_config.json"] = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    files["config.json"] = config
    with atomic_dir(directory) as tmp:
        for name, content in files.items():
            data = content if isinstance(content, bytes) else (json.dumps(content, indent=2) + "\n").encode()
            (tmp / name).write_bytes(data)
        save_file(to_hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(directory)


def tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, dict | bytes]:
    """File name -> JSON object (or bytes) of ``tokenizer`` as AutoTokenizer reads it."""
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT}
    # No clean-up of spaces around punctuation on decode: text comes back as gptcore's decode gives it.
    common = {**special, "model_max_length": block_size, "clean_up_tokenization_spaces": False}
    eot = {str(tokenizer.eot_id): {"content": EOT_TEXT, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}}
    if tokenizer.kind in ("gpt2", "bpe"):
        if tokenizer.kind == "gpt2":
            # GPT-2's own files under the names transformers gives them (encoder.json is
            # vocab.json, vocab.bpe is merges.txt).
            src = tokenizer.directory
            vocab = _read_verified(src / "encoder.json", GPT2_FILES["encoder.json"])
            merges = _read_verified(src / "vocab.bpe", GPT2_FILES["vocab.bpe"])
        else:
            # A trained BPE in GPT-2's file format: GPT-2's tokenizer class applies the same
            # pre-tokenizer and byte alphabet, so only the vocabulary and merges differ.
            spelled, pairs = bpe_vocab_merges(tokenizer.tokens)
            vocab = {**spelled, EOT_TEXT: tokenizer.eot_id}
            merges = ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs)).encode()
        # tokenizer_class picks GPT-2's byte-level BPE whatever the model_type (GPTNeoX's own
        # tokenizer class is another vocabulary).
        return {"vocab.json": vocab, "merges.txt": merges,
                "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer", **common, "unk_token": EOT_TEXT,
                                          "add_prefix_space": False, "add_bos_token": False, "errors": "replace",
                                          "added_tokens_decoder": eot},
                "special_tokens_map.json": {**special, "unk_token": EOT_TEXT}}
    if tokenizer.kind == "char":
        return {"tokenizer.json": char_tokenizer_json(tokenizer.chars),
                "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", **common,
                                          "added_tokens_decoder": eot},
                "special_tokens_map.json": special}
    raise HFError(f"tokenizer kind {tokenizer.kind!r} has no Hugging Face form here; allowed: gpt2 | bpe | char")


def char_tokenizer_json(chars: list[str]) -> dict:
    """A ``tokenizers`` JSON tokenizer giving each character gptcore's id (its index;
    end-of-text is the next id) and decoding by concatenation.

    A BPE model without merges splits text into characters and looks each up, and no
    pre-tokenizer or normalizer touches the text first; the Fuse decoder joins the pieces
    without the spaces a plain decode would put between them. A character outside the
    vocabulary has no id (gptcore refuses such text; this tokenizer drops it)."""
    eot = len(chars)
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": eot, "content": EOT_TEXT, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {**{c: i for i, c in enumerate(chars)}, EOT_TEXT: eot}, "merges": []}}


def bpe_vocab_merges(tokens: list[bytes]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Ranked byte tokens (tiktoken's form) -> GPT-2-style vocab.json and merges.

    tiktoken merges the adjacent pair whose joined bytes rank lowest; a merges file merges
    the listed pair that comes first. Listing, for each token in rank order, every split of
    it into two lower-ranked tokens makes the two agree on every text: whichever pair
    tiktoken would join, the merges file holds it, at the joined token's place."""
    spell = byte_chars()

    def spelled(t: bytes) -> str:
        return "".join(spell[b] for b in t)

    ranks = {t: i for i, t in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        splits = [(ranks[token[:i]], ranks[token[i:]]) for i in range(1, len(token))
                  if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        merges.extend((spelled(tokens[a]), spelled(tokens[b])) for a, b in sorted(splits))
    return {spelled(t): i for i, t in enumerate(tokens)}, merges
