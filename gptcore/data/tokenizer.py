"""Tokenizers: GPT-2 BPE (tiktoken, built from verified local files), a byte-level BPE
trained on the corpus (:mod:`gptcore.data.bpe` trains it; tiktoken encodes it, so both BPEs
share one encoding path) and character-level.

All share one interface (:class:`Tokenizer`) and save themselves into a checkpoint
directory, so a checkpoint loads offline with the exact vocabulary it was trained with.
"""

from __future__ import annotations

import base64
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

    def identity(self) -> tuple:
        """What decides the ids a text gets: equal identities encode every text alike."""
        return (self.kind, self.vocab_size)

    def same_as(self, other: Tokenizer) -> bool:
        """True if both map text to the same ids (same kind and vocabulary)."""
        return self.identity() == other.identity()

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


def byte_chars() -> dict[int, str]:
    """GPT-2's printable spelling of bytes (its vocab.json and merges.txt, and Hugging
    Face's byte-level BPE): printable non-space bytes stand for themselves, the other 68
    bytes for chr(256 + n) in byte order. Iteration order is GPT-2's rank order of bytes."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in set(printable)]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _data_gym_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """GPT-2's (merges, encoder) files -> tiktoken's byte-level mergeable ranks."""
    spelling = byte_chars()
    char_to_byte = {c: b for b, c in spelling.items()}

    def to_bytes(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    ranks = {bytes([b]): i for i, b in enumerate(spelling)}
    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    encoder = {to_bytes(k): v for k, v in json.loads(encoder_json).items() if k != EOT_TEXT}
    if encoder != ranks:  # the merge order must be the rank order tiktoken assumes
        raise TokenizerError("encoder.json and vocab.bpe disagree; not GPT-2's BPE files")
    return ranks


class _TiktokenBPE(Tokenizer):
    """Byte-level BPE encoded by tiktoken (``self._enc``): GPT-2's and a trained one."""

    _enc: tiktoken.Encoding

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


class GPT2Tokenizer(_TiktokenBPE):
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

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        for name in GPT2_FILES:
            shutil.copyfile(self.directory / name, directory / name)
        atomic_write_json(directory / TOKENIZER_FILE, {"kind": self.kind, "files": GPT2_FILES})


BPE_FILE = "bpe_ranks.txt"


class BPETokenizer(_TiktokenBPE):
    """A byte-level BPE trained on the corpus (``tokenizer.kind: bpe``): GPT-2's
    pre-tokenizer and byte alphabet, its own merges, end-of-text as the last id.

    ``tokens`` are the vocabulary's byte strings in rank order: the 256 single bytes, then
    one token per merge in the order training learned them. tiktoken merges the adjacent
    pair whose joined bytes rank lowest, so rank order is the merge order."""

    kind = "bpe"

    def __init__(self, tokens: list[bytes]) -> None:
        if len(tokens) < 256 or set(tokens[:256]) != {bytes([b]) for b in range(256)}:
            raise TokenizerError("a byte-level BPE vocabulary starts with the 256 single bytes")
        if len(set(tokens)) != len(tokens):
            raise TokenizerError("a BPE vocabulary's tokens must be distinct")
        self.tokens = list(tokens)
        self.eot_id = len(tokens)
        self.vocab_size = len(tokens) + 1
        self.digest = sha256_bytes(self._ranks_text().encode())
        ranks = {t: i for i, t in enumerate(tokens)}
        self._enc = tiktoken.Encoding(name=f"gptcore-bpe-{self.vocab_size}", pat_str=r50k_pat_str,
                                      mergeable_ranks=ranks, special_tokens={EOT_TEXT: self.eot_id})

    def _ranks_text(self) -> str:
        # tiktoken's own file format (base64 token, space, rank): readable by tiktoken's loader.
        return "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(self.tokens))

    def identity(self) -> tuple:
        return (self.kind, self.vocab_size, self.digest)

    def describe(self) -> str:
        return f"bpe, {self.vocab_size} ids ({self.digest[:12]})"

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        (directory / BPE_FILE).write_text(self._ranks_text(), encoding="ascii")
        atomic_write_json(directory / TOKENIZER_FILE, {"kind": self.kind, "vocab_size": self.vocab_size,
                                                       "pattern": "gpt2", "file": BPE_FILE, "sha256": self.digest})

    @classmethod
    def load(cls, directory: Path, spec: dict) -> BPETokenizer:
        path = directory / BPE_FILE
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{path}: unreadable ({exc}); a bpe tokenizer keeps its merges there") from None
        if sha256_bytes(text.encode()) != spec.get("sha256"):
            raise TokenizerError(f"{path}: its sha256 is not the one {TOKENIZER_FILE} records (edited or corrupt)")
        tokens = []
        for n, line in enumerate(text.splitlines()):
            token, _, rank = line.partition(" ")
            if rank != str(n):
                raise TokenizerError(f"{path}: line {n + 1} is not '<base64 token> {n}'")
            try:
                tokens.append(base64.b64decode(token, validate=True))
            except ValueError:  # binascii.Error
                raise TokenizerError(f"{path}: line {n + 1}: {token[:40]!r} is not base64") from None
        tokenizer = cls(tokens)
        if tokenizer.vocab_size != spec.get("vocab_size"):
            raise TokenizerError(f"{path}: {tokenizer.vocab_size} ids, {TOKENIZER_FILE} says {spec.get('vocab_size')}")
        return tokenizer


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

    def identity(self) -> tuple:
        return (self.kind, self.vocab_size, tuple(self.chars))

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
    if kind == "bpe":
        return BPETokenizer.load(directory, spec)
    raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r}; allowed: gpt2 | bpe | char")
