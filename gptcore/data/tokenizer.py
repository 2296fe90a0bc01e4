"""Tokenizers: GPT-2 BPE (tiktoken, built from verified local files) and character-level.

Both share one interface (:class:`Tokenizer`) and save themselves into a checkpoint
directory, so a checkpoint loads offline with the exact vocabulary it was trained with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from ..errors import TokenizerError
from ..io import atomic_write_json, read_json_object, sha256_bytes
from .sources import GPT2_BPE

EOT_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"

# The sha256 tiktoken itself checks after downloading GPT-2's BPE files.
GPT2_FILES = {name: src.sha256 for name, src in GPT2_BPE.items()}


class Tokenizer:
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_array(self, text: str):
        """``encode(text)`` as a numpy integer array (bulk tokenization: no Python ints)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode_bytes(self, ids: list[int]) -> bytes:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def same_as(self, other: Tokenizer) -> bool:
        """True if both map text to the same ids (same kind and vocabulary)."""
        return (self.kind, self.vocab_size, getattr(self, "chars", None)) == \
            (other.kind, other.vocab_size, getattr(other, "chars", None))

    def describe(self) -> str:
        return f"{self.kind}, {self.vocab_size} ids"


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: missing (GPT-2 tokenizer needs {', '.join(GPT2_FILES)})") from None
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise TokenizerError(f"{path}: sha256 {actual} does not match GPT-2's {expected_sha256}")
    return data


def _data_gym_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """GPT-2's (merges, encoder) files -> tiktoken's byte-level mergeable ranks.

    GPT-2 stores bytes as printable unicode characters: printable non-space bytes map
    to themselves, the other 68 bytes to chr(256 + n) in byte order.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in char_to_byte.values()]
    char_to_byte.update({chr(256 + n): b for n, b in enumerate(others)})
    ordered = printable + others

    def to_bytes(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    ranks = {bytes([b]): i for i, b in enumerate(ordered)}
    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    encoder = {to_bytes(k): v for k, v in json.loads(encoder_json).items() if k != EOT_TEXT}
    if encoder != ranks:  # the merge order must be the rank order tiktoken assumes
        raise TokenizerError("encoder.json and vocab.bpe disagree; not GPT-2's BPE files")
    return ranks


class GPT2Tokenizer(Tokenizer):
    """tiktoken's ``gpt2`` encoding, token for token, from two sha256-verified files."""

    kind = "gpt2"

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.directory = directory
        vocab = _read_verified(directory / "vocab.bpe", GPT2_FILES["vocab.bpe"])
        encoder = _read_verified(directory / "encoder.json", GPT2_FILES["encoder.json"])
        ranks = _data_gym_ranks(vocab, encoder)
        self.eot_id = len(ranks)  # 50256
        self._enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                      special_tokens={EOT_TEXT: self.eot_id}, explicit_n_vocab=50257)
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # "<|endoftext|>" inside user text is ordinary text, never a control token.
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str):
        # Straight into a uint32 buffer, outside the GIL: no 28-byte Python int per token,
        # and threads encoding chunks side by side don't queue for the GIL to build lists.
        # No special tokens allowed or disallowed = encode_ordinary (tested).
        return self._enc.encode_to_numpy(text, disallowed_special=())

    def decode_bytes(self, ids: list[int]) -> bytes:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id(s) {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return self._enc.decode_bytes(list(ids))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        for name in GPT2_FILES:
            shutil.copyfile(self.directory / name, directory / name)
        atomic_write_json(directory / TOKENIZER_FILE, {"kind": self.kind, "files": GPT2_FILES})


class CharTokenizer(Tokenizer):
    """One id per character seen in the training text, plus an end-of-text id last."""

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise TokenizerError("char vocabulary must be distinct single characters")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            pos = next(i for i, c in enumerate(text) if c not in self.stoi)
            raise TokenizerError(
                f"character(s) {''.join(unknown)!r} (first at position {pos}) are not in the "
                f"{len(self.chars)}-character vocabulary built from the training text; "
                f"allowed: {''.join(self.chars)!r}") from None

    def decode_bytes(self, ids: list[int]) -> bytes:
        out = []
        for i in ids:
            if i == self.eot_id:
                out.append(EOT_TEXT)
            elif 0 <= i < self.eot_id:
                out.append(self.chars[i])
            else:
                raise TokenizerError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
        return "".join(out).encode("utf-8")

    def save(self, directory: str | Path) -> None:
        atomic_write_json(Path(directory) / TOKENIZER_FILE, {"kind": self.kind, "chars": self.chars})


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load the tokenizer a checkpoint (or data directory) saved with :meth:`Tokenizer.save`."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    spec = read_json_object(path, TokenizerError)
    kind = spec.get("kind")
    if kind == "gpt2":
        return GPT2Tokenizer(directory)
    if kind == "char":
        chars = spec.get("chars")
        if not isinstance(chars, list) or not chars:
            raise TokenizerError(f"{path}: 'chars' must be a non-empty list of characters")
        return CharTokenizer(chars)
    raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r}; allowed: gpt2 | char")
