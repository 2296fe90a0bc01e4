"""Corpus -> token files: split the raw text and tokenize each split.

    <processed_dir>/train.bin, val.bin   token ids, uint16 (vocab <= 65,536) or uint32
    <processed_dir>/meta.json            counts, dtype, vocabulary, source sha256, split rule
    <processed_dir>/tokenizer.json ...   the tokenizer, saved so the data loads by itself
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import DataConfig
from .errors import DataError
from .io import atomic_write_bytes, atomic_write_json, sha256_file
from .sources import CORPUS_FILE
from .tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer


def build_tokenizer(kind: str, raw_dir: str | Path, text: str) -> Tokenizer:
    if kind == "gpt2":
        return GPT2Tokenizer(raw_dir)
    return CharTokenizer.from_text(text)


def read_corpus(path: Path) -> str:
    """The corpus as text. It must be UTF-8: a wrong encoding is refused (naming the byte)
    rather than silently replaced. Line ends are kept as they are ("\r\n" included)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the download stage first") from None
    if not data.strip():
        raise DataError(f"{path}: the corpus is empty; nothing to train on")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte {exc.start} ({exc.reason}, byte "
                        f"0x{data[exc.start]:02x}); convert the file to UTF-8") from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split by characters: the first (1 - val_fraction) for training, the rest for validation."""
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_corpus(cfg: DataConfig, tokenizer_kind: str) -> dict:
    """raw text -> ``train.bin``/``val.bin`` (compact ints), ``meta.json`` and the tokenizer."""
    raw, out = Path(cfg.raw_dir), Path(cfg.processed_dir)
    text_path = raw / CORPUS_FILE
    text = read_corpus(text_path)
    tokenizer = build_tokenizer(tokenizer_kind, raw, text)
    train_text, val_text = split_text(text, cfg.val_fraction)
    if not train_text or not val_text:
        raise DataError(f"{text_path}: {len(text)} characters leave an empty "
                        f"{'train' if not train_text else 'val'} split at data.val_fraction={cfg.val_fraction}; "
                        "use a longer text")
    dtype = token_dtype(tokenizer.vocab_size)
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
