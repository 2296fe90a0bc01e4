"""Data: fetch the sources (verified), split and tokenize, and serve training batches.

Downloads come from the upstream URLs in params.yaml, or, when the environment
variable ``GPTCORE_MIRROR`` names a directory, from byte-exact local copies there
(for offline machines and CI). Either way every file's sha256 is checked before it
is written, and it is written atomically, so ``data/`` never holds a partial or
unverified file.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .io import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file
from .tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer

MIRROR_ENV = "GPTCORE_MIRROR"


class DataError(RuntimeError):
    """A source could not be fetched or failed verification, or data files are malformed."""


def _download(url: str, timeout_s: float, name: str) -> bytes:
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "gptcore"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}",
                  file=sys.stderr, disable=None) as bar:
            while chunk := resp.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    data = b"".join(chunks)
    if total is not None and len(data) != total:
        # http.client returns a short body without raising when the connection drops;
        # make it a retryable error rather than a misleading sha256 mismatch.
        raise ConnectionError(f"incomplete download: got {len(data)} of {total} bytes")
    return data


def fetch_sources(cfg: DataConfig, dest: str | Path, mirror: str | Path | None = None) -> dict[str, str]:
    """Place every source in ``dest`` with its sha256 verified; returns {name: sha256}.

    A file already present with the right hash is kept. ``mirror`` (default: the
    ``GPTCORE_MIRROR`` environment variable) takes files from a local directory
    instead of the network.
    """
    dest = Path(dest)
    if mirror is None:
        mirror = os.environ.get(MIRROR_ENV) or None
    fetched = {}
    for name, src in cfg.sources.items():
        target = dest / name
        if target.exists() and sha256_file(target) == src.sha256:
            fetched[name] = src.sha256
            continue
        if mirror is not None:
            origin = Path(mirror) / name
            if not origin.is_file():
                raise DataError(f"{name}: not found in mirror directory {mirror} "
                                f"(set by {MIRROR_ENV}); expected the file {origin}")
            data = origin.read_bytes()
        else:
            origin = src.url
            data = _fetch_with_retries(src.url, name, cfg.retries, cfg.timeout_s)
        actual = sha256_bytes(data)
        if actual != src.sha256:
            raise DataError(f"{name}: sha256 mismatch for {origin}: got {actual}, expected {src.sha256}; "
                            "nothing was written")
        atomic_write_bytes(target, data)
        fetched[name] = actual
    return fetched


def _fetch_with_retries(url: str, name: str, retries: int, timeout_s: float) -> bytes:
    delay = 1.0
    for attempt in range(retries + 1):
        try:
            return _download(url, timeout_s, name)
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            if attempt == retries:
                raise DataError(
                    f"{name}: download from {url} failed after {retries + 1} attempts: {exc}. "
                    f"Offline? Set {MIRROR_ENV} to a directory holding byte-exact copies.") from None
            print(f"download {name}: {exc}; retrying in {delay:.0f}s "
                  f"({attempt + 1}/{retries})", file=sys.stderr)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def build_tokenizer(kind: str, raw_dir: str | Path, text: str) -> Tokenizer:
    if kind == "gpt2":
        return GPT2Tokenizer(raw_dir)
    return CharTokenizer.from_text(text)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split by characters: the first (1 - val_fraction) for training, the rest for validation."""
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_corpus(cfg: DataConfig, tokenizer_kind: str) -> dict:
    """raw text -> ``train.bin``/``val.bin`` (compact ints), ``meta.json`` and the tokenizer."""
    raw, out = Path(cfg.raw_dir), Path(cfg.processed_dir)
    text_path = raw / "input.txt"
    try:
        text = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{text_path}: missing; run the download stage first") from None
    tokenizer = build_tokenizer(tokenizer_kind, raw, text)
    train_text, val_text = split_text(text, cfg.val_fraction)
    dtype = _token_dtype(tokenizer.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, part in (("train", train_text), ("val", val_text)):
        ids = np.asarray(tokenizer.encode(part), dtype=dtype)
        atomic_write_bytes(out / f"{split}.bin", ids.tobytes())
        counts[split] = int(ids.size)
    tokenizer.save(out)
    meta = {
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "train_chars": len(train_text),
        "val_chars": len(val_text),
        "val_bytes": len(val_text.encode("utf-8")),
        "source_sha256": sha256_file(text_path),
        "val_fraction": cfg.val_fraction,
    }
    atomic_write_json(out / "meta.json", meta)
    return meta


@dataclass
class TokenData:
    """A processed split directory: token ids, metadata and tokenizer."""

    train: torch.Tensor  # int64 ids
    val: torch.Tensor
    meta: dict
    tokenizer: Tokenizer

    @classmethod
    def load(cls, processed_dir: str | Path) -> "TokenData":
        import json

        d = Path(processed_dir)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except FileNotFoundError:
            raise DataError(f"{d / 'meta.json'}: missing; run the tokenize stage first") from None
        splits = {}
        for split in ("train", "val"):
            try:
                arr = np.fromfile(d / f"{split}.bin", dtype=np.dtype(meta["dtype"]))
            except FileNotFoundError:
                raise DataError(f"{d / (split + '.bin')}: missing; re-run the tokenize stage") from None
            if arr.size != meta[f"{split}_tokens"]:
                raise DataError(f"{d / (split + '.bin')}: {arr.size} tokens, meta.json says "
                                f"{meta[f'{split}_tokens']}; re-run the tokenize stage")
            if arr.size and int(arr.max()) >= meta["vocab_size"]:
                raise DataError(f"{d / (split + '.bin')}: token id {int(arr.max())} is outside the "
                                f"vocabulary [0, {meta['vocab_size']}); corrupt file, re-run the tokenize stage")
            splits[split] = torch.from_numpy(arr.astype(np.int64))
        return cls(splits["train"], splits["val"], meta, load_tokenizer(d))


class BatchSampler:
    """Random (input, target) windows from a token stream, driven by its own generator.

    Owning the generator makes the data position part of the saved training state:
    restoring ``state_dict()`` replays exactly the same batches.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int) -> None:
        if tokens.numel() < block_size + 1:
            raise DataError(f"split has {tokens.numel()} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}; lower model.block_size or use more data")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(self.tokens.numel() - self.block_size, (self.batch_size,),
                               generator=self.generator)
        windows = self.tokens[starts[:, None] + self._offsets]  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

