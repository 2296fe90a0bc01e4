"""Token dataset: the processed splits, memory-mapped, and random training windows from them.

The token files are never read whole: :class:`TokenData` maps them (``numpy.memmap``),
and :class:`BatchSampler` gathers only the windows of each batch, so a corpus larger
than RAM trains, and torchrun's ranks share one page cache instead of a copy each.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..io import read_json_object
from .tokenizer import Tokenizer, load_tokenizer

# meta.json keys TokenData relies on, and the types they must have.
_META = {"dtype": str, "vocab_size": int, "train_tokens": int, "val_tokens": int, "val_bytes": int,
         "eot_id": int}


def _read_meta(path: Path) -> dict:
    fix = "re-run the tokenize stage (dvc repro -f tokenize)"
    meta = read_json_object(path, DataError, fix, missing="missing; run the tokenize stage first")
    for key, tp in _META.items():
        if not isinstance(meta.get(key), tp) or isinstance(meta.get(key), bool):
            raise DataError(f"{path}: {key!r} is missing or not a {tp.__name__}; {fix}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {meta['dtype']!r} is not uint16 or uint32; {fix}")
    return meta


_CHECK_TOKENS = 1 << 24  # ids validated per read when loading (32 MiB of uint16)


@dataclass
class TokenData:
    """A processed split directory: token ids, metadata and tokenizer.

    ``train``/``val`` are 1-D integer arrays: read-only memory maps of the token files
    after :meth:`load`; tensors or arrays given directly (tests, notebooks) are taken
    as they are, without a copy where possible."""

    train: np.ndarray
    val: np.ndarray
    meta: dict
    tokenizer: Tokenizer
    directory: str = ""  # where it was loaded from ("" when built in memory)
    # sha256 of each split's token file, taken by :meth:`load` in the same read that
    # checks the ids (so tracking never reads the files, or touches the maps, again).
    digests: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train, self.val = _as_array(self.train), _as_array(self.val)

    def describe(self) -> list[dict]:
        """Each split as a dataset entry for tracking: name, digest (sha256 of the token
        file's bytes, first 16 hex digits), source, context and token counts."""
        dtype = np.dtype(self.meta.get("dtype", "int64"))
        tokenizer = self.tokenizer.describe()
        out = []
        for split, context in (("train", "training"), ("val", "validation")):
            tokens = getattr(self, split)
            digest = self.digests.get(split)
            if digest is None:  # built in memory: hash the ids as the token file would hold them
                digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=dtype).tobytes()).hexdigest()
            source = str(Path(self.directory, f"{split}.bin").resolve()) if self.directory else "memory"
            profile = {"tokens": int(tokens.size), "tokenizer": tokenizer,
                       "corpus_sha256": self.meta.get("source_sha256", "")}
            out.append({"name": f"{split} split ({tokenizer})", "digest": digest[:16],
                        "source": source, "context": context, "profile": profile})
        return out

    @classmethod
    def load(cls, processed_dir: str | Path) -> TokenData:
        d = Path(processed_dir)
        meta = _read_meta(d / "meta.json")
        dtype = np.dtype(meta["dtype"])
        splits, digests = {}, {}
        for split in ("train", "val"):
            path = d / f"{split}.bin"
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path}: missing; re-run the tokenize stage") from None
            n = size // dtype.itemsize
            if size % dtype.itemsize or n != meta[f"{split}_tokens"]:
                stray = f" (and {size % dtype.itemsize} stray byte(s))" if size % dtype.itemsize else ""
                raise DataError(f"{path}: {n} tokens, meta.json says {meta[f'{split}_tokens']}{stray}; "
                                "re-run the tokenize stage")
            # An id outside the vocabulary would index past the embedding: check once, in
            # slices read from the file (bounded memory; pages of a map would stay resident).
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while (chunk := np.fromfile(f, dtype=dtype, count=_CHECK_TOKENS)).size:
                    h.update(chunk.tobytes())
                    if int(chunk.max()) >= meta["vocab_size"]:
                        raise DataError(f"{path}: token id {int(chunk.max())} is outside the vocabulary "
                                        f"[0, {meta['vocab_size']}); corrupt file, re-run the tokenize stage")
            # np.memmap cannot map an empty file; an empty split stays an empty array.
            splits[split] = np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)
            digests[split] = h.hexdigest()
        return cls(splits["train"], splits["val"], meta, load_tokenizer(d), str(d), digests)


def _as_array(tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    tokens = np.asanyarray(tokens)  # a memmap stays one (no copy)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise DataError(f"token ids must be a 1-D integer array, got shape {tokens.shape} {tokens.dtype}")
    return tokens


class BatchSampler:
    """Random (input, target) windows from a token stream, driven by its own generator.

    Owning the generator makes the data position part of the saved training state:
    restoring ``state_dict()`` replays exactly the same batches.
    """

    def __init__(self, tokens, block_size: int, batch_size: int, seed: int,
                 name: str = "split") -> None:
        tokens = _as_array(tokens)
        if tokens.size < block_size + 1:
            raise DataError(f"{name} has {tokens.size} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}; lower model.block_size or use more data")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Window starts from the sampler's own torch generator (its state is the resume
        # state); the gather touches only those windows of the memory map.
        starts = torch.randint(self.tokens.size - self.block_size, (self.batch_size,),
                               generator=self.generator).numpy()
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
