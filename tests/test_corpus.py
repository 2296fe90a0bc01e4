"""Your own corpus: data.sources (URLs, files, folders, globs), the split rules, streamed
tokenization equal to whole-text encoding, bounded memory on a ~100 MB corpus, and
training from the memory-mapped token files."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gptcore.data.corpus as corpus
from gptcore.config import CorpusSource, DataConfig, Params
from gptcore.data.corpus import tokenize_corpus
from gptcore.data.dataset import BatchSampler, TokenData
from gptcore.data.documents import resolve_documents, untracked_sources
from gptcore.data.tokenizer import CharTokenizer, GPT2Tokenizer
from gptcore.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]

# Text that exercises the pre-tokenizer around every kind of cut: runs of spaces and
# newlines, CRLF, tabs, digits, contractions, punctuation runs, non-ASCII and a long
# stretch without any space (CJK), where no safe cut exists.
AWKWARD = ("It's   a  test\n\n\n  indented\tline\r\nwith CRLF\r\n\r\n12345 678.9 ... !!! ?!\n"
           "naïve café — déjà vu;  don't  we'll\n \n" + "漢字かな交じり文" * 300 + "\n end  \n")


def _cfg(tmp_path: Path, *sources: CorpusSource, **kw) -> DataConfig:
    return DataConfig(raw_dir=str(tmp_path / "raw"), processed_dir=str(tmp_path / "processed"),
                      sources=sources, **kw)


def _ids(path: Path) -> list[int]:
    return np.fromfile(path, dtype=np.uint16).tolist()


def _assert_chunked_ids_equal_whole_text(tmp_path: Path, text: str, gpt2) -> None:
    """Tokenize ``text`` as a one-file corpus split in halves: each split's ids must be
    the whole half's, so every cut between chunks was a safe one."""
    doc = tmp_path / "doc.txt"
    doc.write_bytes(text.encode("utf-8"))
    tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(doc)), val_fraction=0.5), "gpt2", threads=2)
    n = int(len(text) * 0.5)
    assert _ids(tmp_path / "processed" / "train.bin") == gpt2.encode(text[:n])
    assert _ids(tmp_path / "processed" / "val.bin") == gpt2.encode(text[n:])


@pytest.fixture(scope="module")
def gpt2(mirror_dir) -> GPT2Tokenizer:
    return GPT2Tokenizer(mirror_dir)


@pytest.fixture
def raw(tmp_path, mirror_dir) -> Path:
    """data.raw_dir with GPT-2's BPE files, as the download stage leaves it."""
    d = tmp_path / "raw"
    d.mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        (d / name).write_bytes((mirror_dir / name).read_bytes())
    return d


@pytest.fixture
def folder(tmp_path, mirror_dir) -> Path:
    """A folder of documents: Shakespeare pieces, awkward text, a nested file, a hidden
    file and a non-.txt file (both ignored)."""
    text = (mirror_dir / "input.txt").read_text(encoding="utf-8")
    d = tmp_path / "corpus"
    (d / "nested").mkdir(parents=True)
    (d / ".hidden").mkdir()
    (d / "a.txt").write_text(text[:60_000], encoding="utf-8")
    (d / "b.txt").write_text(AWKWARD * 5, encoding="utf-8", newline="")
    (d / "nested" / "c.txt").write_text(text[60_000:90_000], encoding="utf-8")
    (d / "empty.txt").write_text("", encoding="utf-8")
    (d / ".hidden" / "x.txt").write_text("never read", encoding="utf-8")
    (d / "notes.md").write_text("never read", encoding="utf-8")
    return d


# -- streamed encoding == whole-text encoding --------------------------------------------

@pytest.mark.parametrize("chunk", [64, 1000, 1 << 20])
def test_streamed_token_files_equal_the_in_memory_reference(tmp_path, raw, folder, gpt2, monkeypatch, chunk):
    """Small chunks force thousands of cuts (and the no-space CJK stretch forces the
    wait-for-a-cut path): the files still equal encoding each split's text whole, with
    the end-of-text id between documents and none after the last."""
    monkeypatch.setattr(corpus, "CHUNK_CHARS", chunk)
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 4096)  # multi-byte characters straddle blocks
    meta = tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(folder))), "gpt2", threads=2)
    docs = [folder / "a.txt", folder / "b.txt", folder / "nested" / "c.txt"]  # sorted; empty.txt adds nothing
    texts = [p.read_bytes().decode("utf-8") for p in docs]
    whole = sum(len(t) for t in texts)
    n_train = int(whole * 0.9)
    # The split point falls inside the last document.
    head = sum(len(t) for t in texts[:-1])
    assert head < n_train < whole
    eot = [gpt2.eot_id]
    train_ref = (gpt2.encode(texts[0]) + eot + gpt2.encode(texts[1]) + eot
                 + gpt2.encode(texts[2][:n_train - head]))
    val_ref = gpt2.encode(texts[2][n_train - head:])
    out = tmp_path / "processed"
    assert _ids(out / "train.bin") == train_ref
    assert _ids(out / "val.bin") == val_ref
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train_ref), len(val_ref))
    assert meta["documents"] == {"train": 3, "val": 1}
    assert meta["val_bytes"] == len(texts[2][n_train - head:].encode("utf-8"))
    assert meta["train_chars"] + meta["val_chars"] == whole


def test_default_corpus_is_unchanged(tmp_path, raw, mirror_dir, gpt2):
    """Tiny Shakespeare through the streamed path: the same 301,966 / 36,059 ids as
    encoding the 90/10 character split whole (the committed results depend on it)."""
    (raw / "input.txt").write_bytes((mirror_dir / "input.txt").read_bytes())
    meta = tokenize_corpus(DataConfig(raw_dir=str(raw), processed_dir=str(tmp_path / "processed")), "gpt2")
    text = (mirror_dir / "input.txt").read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    assert _ids(tmp_path / "processed" / "train.bin") == gpt2.encode(text[:n])
    assert _ids(tmp_path / "processed" / "val.bin") == gpt2.encode(text[n:])
    assert meta["sources"] == [{"url": Params().data.sources[0].url, "pinned": True, "bytes": 1_115_394,
                                "n_files": 1, "files": [{"file": "input.txt", "sha256": meta["source_sha256"],
                                                         "bytes": 1_115_394}]}]


def test_char_tokenizer_streams_the_same_ids(tmp_path, raw, folder, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 100)
    tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(folder)), split="documents", val_fraction=0.3), "char")
    data = TokenData.load(tmp_path / "processed")
    tok = data.tokenizer
    assert isinstance(tok, CharTokenizer)
    texts = {p.name: p.read_bytes().decode("utf-8") for p in
             (folder / "a.txt", folder / "b.txt", folder / "nested" / "c.txt")}
    assert tok.chars == sorted(set("".join(texts.values())))
    # split: documents: round(3 * 0.3) = 1 validation document, the smallest sha256.
    by_sha = sorted(texts, key=lambda n: hashlib.sha256(texts[n].encode()).hexdigest())
    val_doc = by_sha[0]
    train_docs = [n for n in ("a.txt", "b.txt", "c.txt") if n != val_doc]
    assert tok.decode(data.val.tolist()) == texts[val_doc]
    assert tok.decode(data.train.tolist()) == "<|endoftext|>".join(texts[n] for n in train_docs)


# -- sources -------------------------------------------------------------------------------

def test_sources_in_order_folder_glob_and_file_with_their_sha256(tmp_path, raw, folder):
    single = tmp_path / "single.txt"
    single.write_text("a single file of text. " * 400, encoding="utf-8")
    sha = hashlib.sha256(single.read_bytes()).hexdigest()
    meta = tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(single), sha256=sha),
                                CorpusSource(path=str(folder / "*.txt")),
                                CorpusSource(path=str(folder / "nested") + "/")), "char")
    files = [[f["file"] for f in s["files"]] for s in meta["sources"]]
    assert files == [[str(single)], [str(folder / n) for n in ("a.txt", "b.txt", "empty.txt")],
                     [f"{folder}/nested/c.txt"]]
    assert [s["pinned"] for s in meta["sources"]] == [True, False, False]
    assert meta["sources"][0]["files"][0]["sha256"] == sha
    assert meta["documents"] == {"train": 4, "val": 1}  # empty.txt is no document


def test_a_file_in_two_sources_is_an_error(tmp_path, raw, folder):
    with pytest.raises(DataError, match=r"c\.txt: listed twice \(data\.sources\[0\] and data\.sources\[1\]\)"):
        tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(folder / "nested" / "c.txt")),
                             CorpusSource(path=str(folder))), "char")


@pytest.mark.parametrize("spec, match", [
    ("missing.txt", r"data\.sources\[0\]\.path='.*missing\.txt': no such file or directory"),
    ("nothing/*.txt", r"the glob matches no file"),
    ("emptydir", r"the directory holds no \*\.txt file"),
])
def test_missing_sources_are_clear_errors_and_write_nothing(tmp_path, raw, spec, match):
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match=match):
        tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(tmp_path / spec))), "char")
    assert not (tmp_path / "processed").exists()


def test_a_changed_pinned_file_is_refused_before_anything_is_written(tmp_path, raw):
    doc = tmp_path / "doc.txt"
    doc.write_text("original text, " * 100, encoding="utf-8")
    pin = hashlib.sha256(doc.read_bytes()).hexdigest()
    cfg = _cfg(tmp_path, CorpusSource(path=str(doc), sha256=pin))
    tokenize_corpus(cfg, "char")
    before = (tmp_path / "processed" / "train.bin").read_bytes()
    doc.write_text("edited text, " * 100, encoding="utf-8")
    with pytest.raises(DataError, match=r"doc\.txt: sha256 [0-9a-f]{64}, but data\.sources\[0\] pins " + pin):
        tokenize_corpus(cfg, "char")
    assert (tmp_path / "processed" / "train.bin").read_bytes() == before  # the previous output is intact


@pytest.mark.parametrize("data, match", [
    ({"sources": [{"url": "https://example.org/corpus.txt"}]},
     r"data\.sources\[0\]='https://example\.org/corpus\.txt' is invalid; allowed: an entry with sha256: "
     r"\(data\.require_sha256=urls requires one"),
    ({"sources": [{"path": "x.txt"}], "require_sha256": "all"}, r"require_sha256=all requires one"),
    ({"sources": [{"path": "x.txt", "url": "https://e.org/y.txt"}]}, r"exactly one of url: .* or path:"),
    ({"sources": [{"url": "ftp://e.org/y.txt", "sha256": "0" * 64}]}, r"allowed: an https:// URL"),
    ({"sources": [{"path": "x.txt", "sha256": "abc"}]}, r"64 lowercase hex digits"),
    ({"sources": [{"path": "corpus/*.txt", "sha256": "0" * 64}]}, r"only on a URL or a single file"),
    ({"sources": []}, r"a non-empty list"),
    ({"sources": [{"url": "https://a.org/t.txt", "sha256": "0" * 64},
                  {"url": "https://b.org/t.txt", "sha256": "1" * 64}]}, r"URLs whose file names differ"),
    ({"sources": [{"path": "data/raw/mine.txt"}]},
     r"data\.sources\[0\]\.path='data/raw/mine\.txt' overlaps data\.raw_dir='data/raw', a pipeline output "
     r"that DVC deletes"),
    ({"sources": [{"path": "gptcore"}], "require_sha256": "all"},
     r"require_sha256=all pins every file, and a directory or glob can't be pinned"),
    ({"sources": [{"url": "http://e.org/y.txt", "sha256": "0" * 64}]}, r"allowed: an https:// URL"),
    ({"split": "lines"}, r"split='lines' is invalid; allowed: chars \| documents"),
    ({"sources": [{"file": "x.txt"}]}, r"unknown key\(s\) 'file'"),
])
def test_bad_sources_are_config_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        Params.from_dict({"data": data})


def test_unpinned_sources_are_allowed_when_asked(tmp_path, raw):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text to learn from. " * 100, encoding="utf-8")
    cfg = Params.from_dict({"data": {"raw_dir": str(raw), "processed_dir": str(tmp_path / "p"),
                                     "sources": [{"path": str(doc)}], "require_sha256": "none"}}).data
    meta = tokenize_corpus(cfg, "char")
    assert meta["sources"][0]["pinned"] is False
    assert meta["sources"][0]["files"][0]["sha256"] == hashlib.sha256(doc.read_bytes()).hexdigest()


def test_documents_split_is_by_content_not_names_or_order(tmp_path, raw):
    """Renaming or reordering files leaves the split as it was; identical files share a
    split (a duplicate cannot leak from train into val)."""
    texts = [f"document number {i}: " + "words " * (50 + i) for i in range(10)]

    def run(names: list[str], sub: str) -> tuple[str, str]:
        d = tmp_path / sub
        d.mkdir()
        for name, text in zip(names, texts):
            (d / name).write_text(text, encoding="utf-8")
        (d / "zz_copy_of_0.txt").write_text(texts[0], encoding="utf-8")
        cfg = DataConfig(raw_dir=str(raw), processed_dir=str(tmp_path / f"p_{sub}"),
                         sources=(CorpusSource(path=str(d)),), split="documents", val_fraction=0.2)
        tokenize_corpus(cfg, "char")
        data = TokenData.load(tmp_path / f"p_{sub}")
        return data.tokenizer.decode(data.train.tolist()), data.tokenizer.decode(data.val.tolist())

    train_a, val_a = run([f"{i:02d}.txt" for i in range(10)], "a")
    train_b, val_b = run([f"renamed_{9 - i}.txt" for i in range(10)], "b")  # other names, other order
    val_docs = set(val_a.split("<|endoftext|>"))
    assert val_docs == set(val_b.split("<|endoftext|>"))
    assert len(val_docs) >= 1 and all(t in texts for t in val_docs)
    assert set(train_a.split("<|endoftext|>")) == set(train_b.split("<|endoftext|>"))
    # 11 documents (one is a copy): both copies of text 0 are on the same side.
    assert (train_a.count(texts[0]), val_a.count(texts[0])) in ((2, 0), (0, 2))


def test_documents_split_needs_two_documents(tmp_path, raw):
    doc = tmp_path / "one.txt"
    doc.write_text("only one document. " * 50, encoding="utf-8")
    with pytest.raises(DataError, match=r"split=documents needs at least 2 non-empty documents"):
        tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(doc)), split="documents"), "char")


def test_local_sources_must_be_dvc_deps(tmp_path):
    """The tokenize stage refuses a corpus path that dvc.yaml does not list: DVC would
    never re-run it when the corpus changes."""
    cfg = _cfg(tmp_path, CorpusSource(path="data/corpus"), CorpusSource(path="books/*.txt"),
               CorpusSource(url="https://e.org/t.txt", sha256="0" * 64))
    root = tmp_path.resolve()
    assert untracked_sources(cfg, [str(root / "data/raw")], root) == ["data/corpus", "books/*.txt"]
    assert untracked_sources(cfg, [str(root / "data"), str(root / "books")], root) == []
    assert untracked_sources(cfg, [str(root / "data/corpus/sub")], root) == ["data/corpus", "books/*.txt"]


# -- a big corpus, bounded memory ------------------------------------------------------------

BIG_SCRIPT = textwrap.dedent("""
    import json, sys
    from gptcore.config import CorpusSource, DataConfig
    from gptcore.data.corpus import tokenize_corpus
    raw, src, out = sys.argv[1:4]
    meta = tokenize_corpus(DataConfig(raw_dir=raw, processed_dir=out,
                                      sources=(CorpusSource(path=src),)), "gpt2", threads=2)
    status = open("/proc/self/status").read()
    peak_kb = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1])
    print(json.dumps({"meta": meta, "peak_rss_mb": peak_kb / 1024}))
""")
# Peak RSS of the whole tokenizing process (Python, numpy, tiktoken and its 50k-entry
# rank tables included) on a ~100 MB corpus. Encoding it in one call would hold the text
# (~100 MB) and ~30 M Python ints: 1,155 MB measured; streamed: 76 MB (AMD EPYC,
# bench/bench_tokenize.py).
BIG_RSS_BOUND_MB = 250


@pytest.mark.slow
def test_a_100mb_corpus_tokenizes_in_bounded_memory_and_trains_from_the_map(tmp_path, raw, mirror_dir, gpt2):
    from gptcore.training.loop import Trainer

    one = (mirror_dir / "input.txt").read_bytes()
    copies = 90  # 100.4 MB
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        for _ in range(copies):
            f.write(one)
    out = tmp_path / "processed"
    proc = subprocess.run([sys.executable, "-c", BIG_SCRIPT, str(raw), str(big), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    meta = report["meta"]
    assert report["peak_rss_mb"] < BIG_RSS_BOUND_MB, report["peak_rss_mb"]
    # Every copy of Tiny Shakespeare encodes to the same 338,025 ids (the file ends in a
    # newline and starts with a letter: a boundary no token spans), but the 90/10 cut
    # may split one token in two.
    assert meta["train_tokens"] + meta["val_tokens"] in (copies * 338_025, copies * 338_025 + 1)
    data = TokenData.load(out)
    assert isinstance(data.train, np.memmap)
    assert data.train[:338_025].tolist() == gpt2.encode(one.decode("utf-8"))
    # Train a few steps straight from the memory map.
    params = Params.from_dict({
        "model": {"block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"device": "cpu", "dtype": "float32", "batch_size": 4, "max_steps": 3, "warmup_steps": 1,
                  "eval_interval": 3, "eval_batches": 1, "checkpoint_interval": 3, "threads": 1}})
    result = Trainer(params, data, tmp_path / "best", tmp_path / "last", progress=False).train()
    assert result.steps == 3 and np.isfinite(result.best_val_loss)
    x, y = BatchSampler(data.train, 32, 4, seed=0, name="train").next()
    assert x.dtype.is_floating_point is False and int(x.max()) < 50257


@pytest.mark.parametrize("text", [
    "id,value,label\r\n" + "".join(f"{i},{i * 7 % 1000},x{i % 13}\r\n" for i in range(3000)),  # CRLF, no spaces
    "".join(f"\u3000\u3000第{i}章。天地玄黄，宇宙洪荒。\n" for i in range(2000)),  # ideographic indents
    "".join(f"\t\tline {i}\n\n\n" for i in range(2000)),  # tabs and blank-line runs
])
def test_cuts_are_found_in_text_without_single_spaces(tmp_path, raw, gpt2, monkeypatch, text):
    """Text whose only breaks are CRLF, ideographic spaces or tab indents still has safe
    cuts: with the forced-cut limit at 4 chunks, a text 10x longer than that encodes
    id for id like the whole text, so every cut was a safe one."""
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 500)
    monkeypatch.setattr(corpus, "MAX_CHUNK_CHARS", 2000)
    assert len(text) > 20_000
    _assert_chunked_ids_equal_whole_text(tmp_path, text, gpt2)


def test_identical_files_never_straddle_the_documents_split(tmp_path, raw):
    d = tmp_path / "corpus"
    d.mkdir()
    texts = {f"{i}.txt": f"document {i} " * 20 for i in range(6)}
    for name, text in texts.items():
        (d / name).write_text(text, encoding="utf-8")
    # Copies of the text that sorts first by sha256: the first validation group.
    first = min(texts.values(), key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    for k in range(3):
        (d / f"copy{k}.txt").write_text(first, encoding="utf-8")
    tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(d)), split="documents", val_fraction=0.1), "char")
    data = TokenData.load(tmp_path / "processed")
    train, val = (data.tokenizer.decode(x.tolist()).split("<|endoftext|>") for x in (data.train, data.val))
    assert val == [first] * 4 and first not in train  # all four copies together, nothing leaked


def test_a_file_changed_during_tokenization_is_an_error(tmp_path, raw, monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text("stable text. " * 500, encoding="utf-8")
    scan = corpus.scan

    def scan_then_edit(*args, **kwargs):
        out = scan(*args, **kwargs)
        doc.write_text("edited while the tokenizer ran. " * 100, encoding="utf-8")
        return out

    monkeypatch.setattr(corpus, "scan", scan_then_edit)
    with pytest.raises(DataError, match=r"doc\.txt: changed while it was being tokenized; run again"):
        tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(doc))), "char")
    assert not (tmp_path / "processed").exists()


def test_an_encoding_failure_stops_at_once_and_closes_everything(tmp_path, raw, monkeypatch, recwarn):
    """The first error is the one raised, queued chunks are dropped, files are closed and
    nothing is published."""
    import gc

    monkeypatch.setattr(corpus, "CHUNK_CHARS", 200)
    doc = tmp_path / "doc.txt"
    doc.write_text("some words to encode " * 2000, encoding="utf-8")
    calls = []
    real = CharTokenizer.encode_array

    def failing(self, text):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encode failed #3")
        if len(calls) > 3:
            raise RuntimeError(f"encode failed #{len(calls)}")
        return real(self, text)

    monkeypatch.setattr(CharTokenizer, "encode_array", failing)
    with pytest.raises(RuntimeError, match=r"^encode failed #3$"):
        tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(doc))), "char", threads=1)
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]
    assert len(calls) < 10  # not the ~200 chunks of the whole text
    assert not (tmp_path / "processed").exists()


def test_a_glob_over_pipeline_outputs_is_refused(tmp_path, raw):
    (raw / "mine.txt").write_text("text in the download stage's output", encoding="utf-8")
    with pytest.raises(DataError, match=r"matches .*mine\.txt, inside data\.raw_dir \(a pipeline output\)"):
        tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(tmp_path / "r*" / "*.txt"))), "char")
    with pytest.raises(DataError, match=r"the glob matches no file \(only 1 directory: a glob must match files"):
        tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(tmp_path / "ra*"))), "char")


LINE_RSS_BOUND_MB = 300


@pytest.mark.slow
@pytest.mark.parametrize("letters_only", [False, True], ids=["punctuated", "letters-only"])
def test_a_30mb_line_without_whitespace_tokenizes_in_bounded_memory(tmp_path, raw, mirror_dir, gpt2,
                                                                     letters_only):
    """Text with no whitespace at all (Tiny Shakespeare with every space and newline
    removed, repeated to one 30 MB line; or its letters alone: one 8 MB pre-tokenizer piece)
    is cut where letters meet punctuation, or where BPE ends a token, so memory stays bounded
    (898 MB peak when a chunk could grow to 16 MiB) and the ids equal tiktoken's."""
    one = "".join((mirror_dir / "input.txt").read_text(encoding="utf-8").split())
    if letters_only:  # one pre-tokenizer piece of 30 MB: only forced (BPE) cuts
        one = "".join(c for c in one if c.isalpha())
    line = tmp_path / "line.txt"
    # 30 MB; the letters-only piece 8 MB (4x the largest chunk: BPE on one long piece
    # runs at ~1 MB/s, so a bigger one only costs CI time).
    copies = (8_000_000 if letters_only else 30_000_000) // len(one) + 1
    with open(line, "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.write(one)
    assert line.stat().st_size >= (8_000_000 if letters_only else 30_000_000)
    out = tmp_path / "processed"
    proc = subprocess.run([sys.executable, "-c", BIG_SCRIPT, str(raw), str(line), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["peak_rss_mb"] < LINE_RSS_BOUND_MB, report["peak_rss_mb"]
    prefix = one * 3  # > 2 chunks of 1 MiB: spans the first cuts
    expected = gpt2.encode(prefix)[:-5]  # the last few ids may merge with what follows
    ids = TokenData.load(out).train[:len(expected)].tolist()
    assert ids == expected


@pytest.mark.parametrize("text", [
    "".join(f"x{i}='it''s{i}',y:=f(a,b)*{i % 7};//ok\u00e9\u0301{i}" for i in range(3000)),  # minified code
    "".join(f"第{i}章天地玄黄,宇宙洪荒.日月盈昃!辰宿列张:{i}" for i in range(2000)),  # CJK, no spaces
    "".join(f"word's{i}don't'll{i}'ve" for i in range(3000)),  # apostrophes at cut candidates
])
def test_text_without_whitespace_is_cut_between_classes_id_for_id(tmp_path, raw, gpt2, monkeypatch, text):
    """No whitespace at all: chunks are cut between letters, numbers and other characters
    (never after an apostrophe), well before the forced-cut limit, and the ids equal the
    whole text's."""
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 500)
    monkeypatch.setattr(corpus, "MAX_CHUNK_CHARS", 2000)
    cuts = []
    real_queue = corpus._SplitWriter._queue
    monkeypatch.setattr(corpus._SplitWriter, "_queue", lambda self, c: (cuts.append(len(c)), real_queue(self, c)))
    assert len(text) > 20_000 and not any(c.isspace() for c in text)
    doc = tmp_path / "doc.txt"
    doc.write_bytes(text.encode("utf-8"))
    tokenize_corpus(_cfg(tmp_path, CorpusSource(path=str(doc)), val_fraction=0.5), "gpt2", threads=2)
    # Cut at the chunk size, not forced at 2,000; only each split's final remainder is longer.
    assert len(cuts) > 10 and sum(c > 500 for c in cuts) <= 2 and max(cuts) < 1000
    n = int(len(text) * 0.5)
    assert _ids(tmp_path / "processed" / "train.bin") == gpt2.encode(text[:n])
    assert _ids(tmp_path / "processed" / "val.bin") == gpt2.encode(text[n:])


def test_a_run_of_one_class_is_cut_where_bpe_ends_a_token(tmp_path, raw, gpt2, monkeypatch):
    """Letters only, no whitespace, no punctuation: one pre-tokenizer piece. Forced cuts
    land where byte-pair encoding ends a token anyway, so the ids still equal the whole
    text's (here with ~40 forced cuts)."""
    import random

    monkeypatch.setattr(corpus, "CHUNK_CHARS", 500)
    monkeypatch.setattr(corpus, "MAX_CHUNK_CHARS", 1000)
    rng = random.Random(0)
    text = "".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(40_000))
    _assert_chunked_ids_equal_whole_text(tmp_path, text, gpt2)


@pytest.mark.parametrize("kind", ["fifo", "symlink loop", "broken link"])
def test_special_files_as_sources_are_refused_by_name(tmp_path, kind):
    """A FIFO given as a source was "no such file or directory" (and made `dvc repro` hang
    hashing it as a dep); a symlink loop was a RuntimeError traceback. A glob's matches
    are checked the same way."""
    import os

    odd = tmp_path / "odd.txt"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to(odd.name if kind == "symlink loop" else "missing.txt")
    expected = {"fifo": "a FIFO (named pipe)", "symlink loop": "a symlink loop", "broken link": "a broken symlink"}
    if kind == "symlink loop":  # every stage validates params first: it fails there
        with pytest.raises(ConfigError, match=r"data.sources\[0\].path='.*odd.txt' is a symlink loop"):
            Params.from_dict({"data": {"sources": [{"path": str(odd)}], "require_sha256": "none"}})
    for spec in (str(odd), str(tmp_path / "*.txt")):
        with pytest.raises(DataError, match=rf"^data.sources\[0\]: .*odd.txt is {re.escape(expected[kind])}; "
                           "allowed: regular"):
            resolve_documents(_cfg(tmp_path, CorpusSource(path=spec)))
