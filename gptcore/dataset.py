"""Token dataset: the processed splits in memory, and random training windows from them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .tokenizer import Tokenizer, load_tokenizer

# meta.json keys TokenData relies on, and the types they must have.
_META = {"dtype": str, "vocab_size": int, "train_tokens": int, "val_tokens": int, "val_bytes": int,
         "eot_id": int}


def _read_meta(path: Path) -> dict:
    fix = "re-run the tokenize stage (dvc repro -f tokenize)"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the tokenize stage first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object; {fix}")
    for key, tp in _META.items():
        if not isinstance(meta.get(key), tp) or isinstance(meta.get(key), bool):
            raise DataError(f"{path}: {key!r} is missing or not a {tp.__name__}; {fix}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {meta['dtype']!r} is not uint16 or uint32; {fix}")
    return meta


@dataclass
class TokenData:
    """A processed split directory: token ids, metadata and tokenizer."""

    train: torch.Tensor  # int64 ids
    val: torch.Tensor
    meta: dict
    tokenizer: Tokenizer
    directory: str = ""  # where it was loaded from ("" when built in memory)

    def describe(self) -> list[dict]:
        """Each split as a dataset entry for tracking: name, digest (sha256 of the token
        file's bytes, first 16 hex digits), source, context and token counts."""
        import hashlib

        dtype = np.dtype(self.meta.get("dtype", "int64"))
        tokenizer = self.tokenizer.describe()
        out = []
        for split, context in (("train", "training"), ("val", "validation")):
            tokens = getattr(self, split)
            digest = hashlib.sha256(tokens.numpy().astype(dtype).tobytes()).hexdigest()[:16]
            source = str(Path(self.directory, f"{split}.bin").resolve()) if self.directory else "memory"
            profile = {"tokens": int(tokens.numel()), "tokenizer": tokenizer,
                       "corpus_sha256": self.meta.get("source_sha256", "")}
            out.append({"name": f"{split} split ({tokenizer})", "digest": digest,
                        "source": source, "context": context, "profile": profile})
        return out

    @classmethod
    def load(cls, processed_dir: str | Path) -> "TokenData":
        d = Path(processed_dir)
        meta = _read_meta(d / "meta.json")
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
        return cls(splits["train"], splits["val"], meta, load_tokenizer(d), str(d))


class BatchSampler:
    """Random (input, target) windows from a token stream, driven by its own generator.

    Owning the generator makes the data position part of the saved training state:
    restoring ``state_dict()`` replays exactly the same batches.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int,
                 name: str = "split") -> None:
        if tokens.numel() < block_size + 1:
            raise DataError(f"{name} has {tokens.numel()} tokens, fewer than block_size + 1 = "
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
