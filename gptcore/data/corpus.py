"""Corpus -> token files, streamed: any number of sources, any size, bounded memory.

    <processed_dir>/train.bin, val.bin   token ids, uint16 (vocab <= 65,536) or uint32
    <processed_dir>/meta.json            counts, dtype, vocabulary, sources and their sha256,
                                         the split rule
    <processed_dir>/tokenizer.json ...   the tokenizer, saved so the data loads by itself

The corpus is the ``data.sources`` entries in order; every file is one *document*, and
documents are joined by the end-of-text token (none after the last one, so a one-file
corpus tokenizes exactly as one string). Two passes, neither holding the corpus:

1. **scan** every document in 1 MiB blocks: sha256 (checked against a pinned one, else
   recorded), strict UTF-8 (an error names the file and byte), character count and, for
   the char tokenizer, the character set.
   For ``tokenizer.kind: bpe``, one more pass reads the train split's text into the BPE
   trainer (:mod:`gptcore.data.bpe`): validation text never shapes the vocabulary.
2. **tokenize**: decode the blocks again, cut the text into ~1 MiB chunks at places
   where GPT-2's pre-tokenizer splits anyway (a single space or newline between two
   non-space characters: no BPE token can span it, so chunked encoding equals encoding
   the whole text, token for token), encode the chunks on a thread pool while reading
   on (tiktoken releases the GIL), and append the ids to the split's file in order.

Everything is written into a temporary directory that replaces ``processed_dir`` only
when complete, so a crash or Ctrl-C never leaves a ``train.bin`` that looks finished.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import DataConfig
from ..errors import DataError
from ..io import atomic_dir, atomic_write_json
from .bpe import train_bpe
from .cuts import bpe_cut, last_class_cut, last_safe_cut
from .documents import Document, resolve_documents
from .tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer

BLOCK_BYTES = 1 << 20  # read size
CHUNK_CHARS = 1 << 20  # encode size: big enough to amortise a call, small enough for cache and RAM
# A chunk with no safe cut (a run of one character class: a "word" of millions of letters)
# grows up to this before it is cut where BPE ends a token anyway (cuts.bpe_cut). Encoding
# costs ~60 bytes of memory per character of a chunk, so this bounds the peak: ~120 MB.
MAX_CHUNK_CHARS = 2 * CHUNK_CHARS
# Listing every file of a huge folder would bloat meta.json: beyond this, a count and digest.
MAX_LISTED_FILES = 1000

def build_tokenizer(kind: str, raw_dir: str | Path, chars: set[str] | None = None) -> Tokenizer:
    if kind == "gpt2":
        return GPT2Tokenizer(raw_dir)
    return CharTokenizer(sorted(chars or ()))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _decoded_blocks(doc: Document, hasher=None) -> Iterator[tuple[str, int]]:
    """(text, its byte count) per block of ``doc``; invalid UTF-8 is an error naming the
    byte. ``hasher`` sees every byte read, so the bytes checked are the bytes tokenized."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(doc.path, "rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            final = not block
            if hasher is not None:
                hasher.update(block)
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as exc:
                pending = len(exc.object) - len(block)  # bytes the decoder held from the last block
                at = offset - pending + exc.start
                raise DataError(f"{doc.label}: not valid UTF-8 at byte {at} ({exc.reason}, byte "
                                f"0x{exc.object[exc.start]:02x}); convert the file to UTF-8") from None
            if text or block:
                yield text, len(block)
            if final:
                return
            offset += len(block)


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                file=sys.stderr, disable=not progress or None, dynamic_ncols=True)


def scan(docs: list[Document], cfg: DataConfig, want_chars: bool, progress: bool = True) -> set[str]:
    """Pass 1: sha256, UTF-8 check and character count of every document (and the
    character set when ``want_chars``); pinned sources must match their sha256."""
    charset: set[str] = set()
    for doc in docs:
        doc.size = doc.path.stat().st_size
    with _bar(sum(d.size for d in docs), "scan", progress) as bar:
        for doc in docs:
            h, n = hashlib.sha256(), 0
            for text, nbytes in _decoded_blocks(doc, h):
                n += len(text)
                doc.blank = doc.blank and not text.strip()
                if want_chars:
                    charset.update(text)
                bar.update(nbytes)
            doc.chars, doc.sha256 = n, h.hexdigest()
            pinned = cfg.sources[doc.source].sha256
            if pinned and doc.sha256 != pinned:
                raise DataError(f"{doc.label}: sha256 {doc.sha256}, but data.sources[{doc.source}] pins "
                                f"{pinned}; the file changed: update the sha256 or restore the file")
    return charset


# -- the split ------------------------------------------------------------------------

def plan_split(docs: list[Document], cfg: DataConfig) -> list[tuple[Document, int]]:
    """For each document, the character index where its validation part starts:
    ``chars``: the last ``val_fraction`` of all characters (documents in order);
    ``documents``: documents in order of their sha256 go to validation until it holds
    ``round(n * val_fraction)`` (at least 1), identical files together: deterministic,
    independent of names and order, and a duplicate can't straddle the split."""
    total = sum(d.chars for d in docs)
    if cfg.split == "chars":
        n_train = int(total * (1 - cfg.val_fraction))
        plan, at = [], 0
        for d in docs:
            plan.append((d, min(d.chars, max(0, n_train - at))))
            at += d.chars
        return plan
    live = [d for d in docs if d.chars]
    if len(live) < 2:
        raise DataError(f"data.split=documents needs at least 2 non-empty documents (files), the corpus has "
                        f"{len(live)}; add files or use data.split: chars")
    # Identical files form one group and go to one side together: a copy can't leak.
    groups: dict[str, list[Document]] = {}
    for d in live:
        groups.setdefault(d.sha256, []).append(d)
    if len(groups) < 2:
        raise DataError(f"data.split=documents needs at least 2 different documents, the corpus has "
                        f"{len(live)} identical one(s); add files or use data.split: chars")
    n_val = max(1, round(len(live) * cfg.val_fraction))
    val: set[int] = set()
    for sha in sorted(groups)[:-1]:  # the last group always stays in train
        if len(val) >= n_val:
            break
        val.update(id(d) for d in groups[sha])
    return [(d, 0 if id(d) in val else d.chars) for d in docs]


# -- streamed encoding ----------------------------------------------------------------

@dataclass
class _SplitWriter:
    """Appends one split's token ids to its file: text arrives in pieces, is cut at safe
    places into chunks, and each chunk is encoded on the thread pool while the next is
    read (tiktoken releases the GIL); results are written in order, and at most
    ``2 * threads`` chunks are in flight, which bounds the memory."""

    path: Path
    tokenizer: Tokenizer
    dtype: np.dtype
    pool: ThreadPoolExecutor
    threads: int
    tokens: int = 0
    chars: int = 0
    nbytes: int = 0
    documents: int = 0
    _buf: list[str] = field(default_factory=list)
    _buf_len: int = 0
    _inflight: deque = field(default_factory=deque)  # futures of id lists, and None (= end-of-text)
    _in_doc: bool = False
    _file: object = None

    def __post_init__(self) -> None:
        self._file = open(self.path, "wb")

    def feed(self, text: str) -> None:
        if not text:
            return
        if not self._in_doc:
            if self.documents:
                self._inflight.append(None)  # between documents, never after the last
            self.documents += 1
            self._in_doc = True
        self.chars += len(text)
        self.nbytes += len(text.encode("utf-8"))
        self._buf.append(text)
        self._buf_len += len(text)
        if self._buf_len >= 2 * CHUNK_CHARS:
            self._cut()

    def end_document(self) -> None:
        if self._buf_len:
            self._queue("".join(self._buf))
            self._buf, self._buf_len = [], 0
        self._in_doc = False

    def _cut(self) -> None:
        """Queue whole chunks from the buffer, keeping the text after the last safe cut."""
        text = "".join(self._buf)
        start = 0
        while len(text) - start >= 2 * CHUNK_CHARS:
            target = start + CHUNK_CHARS
            cut = last_safe_cut(text, start + CHUNK_CHARS // 2, target)
            if cut is None:  # text without spaces or newlines: cut where a piece ends anyway
                cut = last_class_cut(text, start + CHUNK_CHARS // 2, target)
            if cut is None:
                cut = last_safe_cut(text, start + 1, len(text) - 1) or \
                    last_class_cut(text, start + 1, len(text) - 1)
                if cut is None:
                    if len(text) - start < MAX_CHUNK_CHARS:
                        break  # wait for more text: a cut may come
                    cut = bpe_cut(self.tokenizer, text, target, CHUNK_CHARS)
            self._queue(text[start:cut])
            start = cut
        rest = text[start:]
        self._buf, self._buf_len = [rest], len(rest)

    def _queue(self, chunk: str) -> None:
        self._inflight.append(self.pool.submit(self._encode, chunk))
        while len(self._inflight) > 2 * self.threads:
            self._write_one()

    def _encode(self, chunk: str) -> np.ndarray:  # on a pool thread
        return self.tokenizer.encode_array(chunk).astype(self.dtype, copy=False)

    def _write_one(self) -> None:
        item = self._inflight.popleft()
        ids = np.array([self.tokenizer.eot_id], dtype=self.dtype) if item is None else item.result()
        with self._naming_the_file():
            # file.write, not ndarray.tofile: on a full disk tofile says only "317725 requested
            # and 149378 written", without the errno or the file.
            self._file.write(ids.tobytes())
        self.tokens += ids.size

    @contextlib.contextmanager
    def _naming_the_file(self):
        """An OSError from writing names this file (a buffered write's own error does not)."""
        try:
            yield
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc
            raise

    def close(self) -> None:
        """Encode and write what is left, then close the file."""
        try:
            self.end_document()
            while self._inflight:
                self._write_one()
            with self._naming_the_file():
                self._file.flush()  # the buffer's last bytes: a full disk may show only here
        finally:
            self._file.close()

    def abort(self) -> None:
        """After an error: drop the queued chunks (no more encoding) and close the file."""
        for item in self._inflight:
            if item is not None:
                item.cancel()
        self._inflight.clear()
        self._file.close()


def tokenize_corpus(cfg: DataConfig, tokenizer_kind: str, progress: bool = False,
                    threads: int | None = None, init_chars: list[str] | None = None,
                    vocab_size: int = 4096, init_tokenizer: Tokenizer | None = None) -> dict:
    """``data.sources`` -> ``train.bin``/``val.bin``, ``meta.json`` and the tokenizer,
    streamed (peak memory independent of the corpus size). Returns the meta dict.

    ``init_chars``: a char-level fine-tune's vocabulary (the init model's characters, in id
    order), used instead of the text's own so that ids mean what they meant in pretraining.
    ``vocab_size``: ``tokenizer.kind: bpe``'s, trained on the train split unless
    ``init_tokenizer`` (a bpe fine-tune's: the init model's own) is given."""
    docs = resolve_documents(cfg)
    charset = scan(docs, cfg, want_chars=tokenizer_kind == "char", progress=progress)
    plan = _checked_plan(docs, cfg)
    if tokenizer_kind == "bpe":
        t0 = time.perf_counter()
        tokenizer = init_tokenizer or train_bpe(_train_texts(plan, progress), vocab_size)
        if progress and init_tokenizer is None:
            print(f"trained the tokenizer ({tokenizer.describe()}) on the train split in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    elif tokenizer_kind == "char" and init_chars is not None:
        unknown = sorted(charset - set(init_chars))
        if unknown:
            where = docs[0].label if len(docs) == 1 else f"{len(docs)} files"
            raise DataError(f"{where}: character(s) {''.join(unknown)!r} are not in the init model's "
                            f"{len(init_chars)}-character vocabulary (train.init_from), and a char model has no "
                            "id for a character it never saw; allowed: text in its characters "
                            f"{''.join(init_chars)!r}, or train.init_from=scratch")
        tokenizer: Tokenizer = CharTokenizer(init_chars)
    else:
        tokenizer = build_tokenizer(tokenizer_kind, cfg.raw_dir, charset)
    dtype = token_dtype(tokenizer.vocab_size)
    # One core stays with this thread (reading, decoding, cutting, writing): on the
    # 2-core machines, 2 encoders beside it ran 12-27 MB/s depending on the run, 1 ran
    # a steady 20 (100 MB, bench/bench_tokenize.py).
    threads = threads or max(1, min(8, (os.cpu_count() or 2) - 1))
    t0 = time.perf_counter()
    with atomic_dir(cfg.processed_dir) as tmp, ThreadPoolExecutor(threads) as pool:
        writers = {s: _SplitWriter(tmp / f"{s}.bin", tokenizer, dtype, pool, threads) for s in ("train", "val")}
        _encode_documents(plan, writers, progress)
        tokenizer.save(tmp)
        meta = _meta(cfg, docs, tokenizer, dtype, writers["train"], writers["val"])
        atomic_write_json(tmp / "meta.json", meta)
    if progress:
        seconds, mb = time.perf_counter() - t0, sum(d.size for d in docs) / 1e6
        print(f"tokenized {mb:,.1f} MB into {meta['train_tokens'] + meta['val_tokens']:,} tokens in "
              f"{seconds:.1f} s ({mb / max(seconds, 1e-9):,.1f} MB/s, {threads} encoding "
              f"thread{'s' if threads > 1 else ''})", file=sys.stderr)
    return meta


def _train_texts(plan: list[tuple[Document, int]], progress: bool) -> Iterator[str]:
    """The train split's text in ~1 MiB stretches, each cut where GPT-2's pre-tokenizer ends
    a piece (so the trainer counts the words the encoder will see) and none spanning two
    documents (they are joined by end-of-text, which no merge crosses)."""
    with _bar(sum(doc.size * val_at // max(doc.chars, 1) for doc, val_at in plan), "bpe", progress) as bar:
        for doc, val_at in plan:
            if not val_at:
                continue
            at, buf = 0, ""
            for text, nbytes in _decoded_blocks(doc):
                part = text[:max(0, val_at - at)]
                at += len(text)
                buf += part
                bar.update(nbytes * len(part) // max(len(text), 1))
                while len(buf) >= 2 * CHUNK_CHARS:
                    cut = (last_safe_cut(buf, CHUNK_CHARS // 2, CHUNK_CHARS)
                           or last_class_cut(buf, CHUNK_CHARS // 2, CHUNK_CHARS))
                    if cut is None:  # one piece over 1 MiB: counted as two pieces (its merges barely change)
                        cut = CHUNK_CHARS
                    yield buf[:cut]
                    buf = buf[cut:]
                if at >= val_at:
                    break
            if buf:
                yield buf


def _checked_plan(docs: list[Document], cfg: DataConfig) -> list[tuple[Document, int]]:
    """The split plan, refusing a corpus with nothing in it or with an empty split."""
    total = sum(d.chars for d in docs)
    where = docs[0].label if len(docs) == 1 else f"{len(docs)} files"
    if all(d.blank for d in docs):
        raise DataError(f"{where}: the corpus is empty; nothing to train on")
    plan = plan_split(docs, cfg)
    n_train = sum(k for _, k in plan)
    if n_train == 0 or n_train == total:
        raise DataError(f"{where}: {total} characters leave an empty {'train' if n_train == 0 else 'val'} "
                        f"split at data.val_fraction={cfg.val_fraction}; use a longer text")
    return plan


def _encode_documents(plan: list[tuple[Document, int]], writers: dict[str, _SplitWriter],
                      progress: bool) -> None:
    """Pass 2: feed each document's text to its split's writer (a document may straddle
    the split), then finish the writers; on any error drop the queued work first."""
    t0 = time.perf_counter()
    try:
        with _bar(sum(doc.size for doc, _ in plan), "tokenize", progress) as bar:
            for doc, val_at in plan:
                at, h = 0, hashlib.sha256()
                for text, nbytes in _decoded_blocks(doc, h):
                    if at < val_at:  # the train part of this document
                        writers["train"].feed(text[:val_at - at])
                        if at + len(text) >= val_at:
                            writers["train"].end_document()
                    if at + len(text) > val_at:
                        writers["val"].feed(text[max(0, val_at - at):])
                    at += len(text)
                    bar.update(nbytes)
                    done = writers["train"].tokens + writers["val"].tokens
                    bar.set_postfix(tokens=f"{done:,}", tok_s=f"{done / (time.perf_counter() - t0):,.0f}",
                                    refresh=False)
                if at != doc.chars or h.hexdigest() != doc.sha256:
                    # The split, the pins and meta.json were computed from the scan.
                    raise DataError(f"{doc.label}: changed while it was being tokenized; run again "
                                    "once nothing writes to the corpus")
                writers["train"].end_document()
                writers["val"].end_document()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()


def _meta(cfg: DataConfig, docs: list[Document], tokenizer: Tokenizer, dtype: np.dtype,
          train: _SplitWriter, val: _SplitWriter) -> dict:
    """meta.json: what the token files hold and where it came from."""
    return {
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "train_tokens": train.tokens,
        "val_tokens": val.tokens,
        "train_chars": train.chars,
        "train_bytes": train.nbytes,
        "val_chars": val.chars,
        "val_bytes": val.nbytes,
        "source_sha256": _corpus_digest(docs),
        "split": cfg.split,
        "val_fraction": cfg.val_fraction,
        "documents": {"train": train.documents, "val": val.documents},
        "sources": _describe_sources(cfg, docs),
    }


def _corpus_digest(docs: list[Document]) -> str:
    """One file: its sha256 (so the default corpus keeps its familiar checksum). Several:
    the sha256 of their ``sha256  label`` lines, like a SHA256SUMS file."""
    if len(docs) == 1:
        return docs[0].sha256
    return hashlib.sha256("".join(f"{d.sha256}  {d.label}\n" for d in docs).encode()).hexdigest()


def _describe_sources(cfg: DataConfig, docs: list[Document]) -> list[dict]:
    out = []
    for i, src in enumerate(cfg.sources):
        mine = [d for d in docs if d.source == i]
        entry = {"url": src.url} if src.url else {"path": src.path}
        entry.update(pinned=bool(src.sha256), bytes=sum(d.size for d in mine), n_files=len(mine))
        if len(mine) <= MAX_LISTED_FILES:
            entry["files"] = [{"file": d.label, "sha256": d.sha256, "bytes": d.size} for d in mine]
        else:
            entry["files_sha256"] = _corpus_digest(mine)
        out.append(entry)
    return out
