"""Data: verified fetching (mirror and real local HTTP), tokenization, batches."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gptcore.config import CorpusSource, DataConfig
from gptcore.data.corpus import tokenize_corpus
from gptcore.data.dataset import BatchSampler, TokenData
from gptcore.data.fetch import MIRROR_ENV, fetch_sources
from gptcore.data.sources import SOURCES, Source
from gptcore.data.tokenizer import GPT2_FILES
from gptcore.errors import DataError

NAMES = ("input.txt", "vocab.bpe", "encoder.json")
INPUT_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mirror_copy(tmp_path, mirror_dir) -> Path:
    d = tmp_path / "mirror"
    d.mkdir()
    for n in NAMES:
        shutil.copyfile(mirror_dir / n, d / n)
    return d


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


# -- mirror ------------------------------------------------------------------------------

def test_default_sources_match_the_mirror(mirror_dir):
    assert set(SOURCES) == set(NAMES)
    assert SOURCES["input.txt"].sha256 == INPUT_SHA
    for name in ("vocab.bpe", "encoder.json"):
        assert SOURCES[name].sha256 == GPT2_FILES[name]
    for name, src in SOURCES.items():
        assert _sha(mirror_dir / name) == src.sha256


def test_fetch_from_mirror_verifies_and_writes(tmp_path, mirror_dir):
    dest = tmp_path / "raw"
    got = fetch_sources(dest, mirror=mirror_dir)
    assert got == {n: s.sha256 for n, s in SOURCES.items()}
    for n in NAMES:
        assert (dest / n).read_bytes() == (mirror_dir / n).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(NAMES)  # no temp files left


def test_fetch_uses_env_mirror(tmp_path, mirror_dir, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(mirror_dir))
    dest = tmp_path / "raw"
    fetch_sources(dest)
    assert _sha(dest / "input.txt") == INPUT_SHA


def test_tampered_mirror_file_is_rejected_and_nothing_written(tmp_path, mirror_copy):
    with open(mirror_copy / "input.txt", "ab") as f:
        f.write(b"tampered\n")
    bad = _sha(mirror_copy / "input.txt")
    dest = tmp_path / "raw"
    with pytest.raises(DataError) as info:
        fetch_sources(dest, mirror=mirror_copy)
    msg = str(info.value)
    assert "input.txt" in msg and bad in msg and INPUT_SHA in msg and "mismatch" in msg
    assert not (dest / "input.txt").exists()
    assert not dest.exists() or not any(p.name.startswith(".input.txt") for p in dest.iterdir())


def test_missing_mirror_file_is_a_clear_error(tmp_path, mirror_copy):
    (mirror_copy / "vocab.bpe").unlink()
    with pytest.raises(DataError, match=r"vocab\.bpe: not found in mirror directory .*GPTCORE_MIRROR"):
        fetch_sources(tmp_path / "raw", mirror=mirror_copy)


def test_valid_files_are_kept_and_invalid_ones_replaced(tmp_path, mirror_dir, mirror_copy):
    dest = tmp_path / "raw"
    fetch_sources(dest, mirror=mirror_dir)
    inodes = {n: (dest / n).stat().st_ino for n in NAMES}
    # An empty mirror: valid files already in dest are kept without consulting it.
    empty = tmp_path / "empty"
    empty.mkdir()
    fetch_sources(dest, mirror=empty)
    assert {n: (dest / n).stat().st_ino for n in NAMES} == inodes
    # A corrupted file in dest is fetched again (and only that one).
    (dest / "encoder.json").write_bytes(b"{}")
    fetch_sources(dest, mirror=mirror_copy)
    assert _sha(dest / "encoder.json") == GPT2_FILES["encoder.json"]
    assert (dest / "input.txt").stat().st_ino == inodes["input.txt"]


# -- HTTP (a real server on 127.0.0.1) ---------------------------------------------------

class _Server:
    """Serves files from a directory; ``fail[name]`` leading requests get a 500,
    ``truncate[name]`` leading requests get a body cut short."""

    def __init__(self, root: Path) -> None:
        self.root, self.fail, self.truncate, self.hits = root, {}, {}, {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                outer.hits[name] = outer.hits.get(name, 0) + 1
                if outer.fail.get(name, 0) > 0:
                    outer.fail[name] -= 1
                    self.send_error(500, "boom")
                    return
                path = outer.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if outer.truncate.get(name, 0) > 0:
                    outer.truncate[name] -= 1
                    self.wfile.write(data[: len(data) // 3])
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(mirror_dir):
    s = _Server(mirror_dir)
    yield s
    s.close()


def _http_fetch(dest: Path, url_of, retries: int = 0, names=NAMES) -> dict:
    """Fetch ``names`` over HTTP from ``url_of(name)``, with the real checksums."""
    sources = {n: Source(url_of(n), SOURCES[n].sha256) for n in names}
    return fetch_sources(dest, sources, retries=retries, timeout_s=10.0)


def test_download_over_http_without_mirror(tmp_path, server, mirror_dir):
    dest = tmp_path / "raw"
    _http_fetch(dest, server.url)
    for n in NAMES:
        assert (dest / n).read_bytes() == (mirror_dir / n).read_bytes()
        assert server.hits[n] == 1


def test_http_500_then_ok_is_retried(tmp_path, server, capfd):
    server.fail["input.txt"] = 1
    dest = tmp_path / "raw"
    _http_fetch(dest, server.url, retries=1, names=("input.txt",))
    assert server.hits["input.txt"] == 2
    assert _sha(dest / "input.txt") == INPUT_SHA
    assert "retrying" in capfd.readouterr().err


def test_truncated_http_body_is_retried_not_reported_as_mismatch(tmp_path, server):
    server.truncate["input.txt"] = 1
    dest = tmp_path / "raw"
    _http_fetch(dest, server.url, retries=1, names=("input.txt",))
    assert server.hits["input.txt"] == 2
    assert _sha(dest / "input.txt") == INPUT_SHA


def test_http_content_with_wrong_hash_is_rejected(tmp_path, server, mirror_dir):
    sha = SOURCES["vocab.bpe"].sha256
    # input.txt served under the name whose hash is vocab.bpe's.
    sources = {"input.txt": Source(server.url("input.txt"), sha)}
    dest = tmp_path / "raw"
    with pytest.raises(DataError, match=rf"input\.txt: sha256 mismatch for {server.url('input.txt')}"):
        fetch_sources(dest, sources, retries=0)
    assert not (dest / "input.txt").exists()


def test_unreachable_url_fails_after_retries_mentioning_mirror(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as info:
        _http_fetch(tmp_path / "raw", lambda n: f"http://127.0.0.1:{port}/{n}", retries=1, names=("input.txt",))
    msg = str(info.value)
    assert "input.txt" in msg and "after 2 attempts" in msg and MIRROR_ENV in msg
    assert not (tmp_path / "raw" / "input.txt").exists()


# -- tokenization ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, mirror_dir) -> Path:
    d = tmp_path_factory.mktemp("raw")
    for n in NAMES:
        shutil.copyfile(mirror_dir / n, d / n)
    return d


def test_tokenize_gpt2(tmp_path, raw_dir):
    out = tmp_path / "processed"
    cfg = DataConfig(raw_dir=str(raw_dir), processed_dir=str(out))
    meta = tokenize_corpus(cfg, "gpt2")
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257 and meta["eot_id"] == 50256
    assert meta["source_sha256"] == INPUT_SHA
    assert (out / "train.bin").stat().st_size == 301_966 * 2
    assert (out / "val.bin").stat().st_size == 36_059 * 2
    assert json.loads((out / "meta.json").read_text()) == meta
    data = TokenData.load(out)
    # Memory-mapped, never converted: the split stays the file's uint16 ids.
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16 and data.train.size == 301_966
    text = (raw_dir / "input.txt").read_text()
    assert data.train[:2].tolist() == data.tokenizer.encode("First Citizen") == [5962, 22307]
    assert data.tokenizer.decode(data.train.tolist()) + data.tokenizer.decode(data.val.tolist()) == text
    assert int(data.train.max()) < 50257


def test_tokenize_char(tmp_path, raw_dir):
    out = tmp_path / "processed"
    cfg = DataConfig(raw_dir=str(raw_dir), processed_dir=str(out))
    meta = tokenize_corpus(cfg, "char")
    text = (raw_dir / "input.txt").read_text()
    assert meta["vocab_size"] == 66 and meta["eot_id"] == 65  # 65 characters + end-of-text
    assert meta["dtype"] == "uint16"
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert meta["train_tokens"] == meta["train_chars"] == int(len(text) * 0.9)
    data = TokenData.load(out)
    assert len(data.tokenizer.chars) == 65 and data.tokenizer.chars == sorted(set(text))
    assert data.tokenizer.decode(data.val.tolist()) == text[meta["train_tokens"]:]
    assert np.fromfile(out / "train.bin", dtype=np.uint16).size == meta["train_tokens"]


def test_tokenize_without_input_is_a_clear_error(tmp_path):
    cfg = DataConfig(raw_dir=str(tmp_path / "nothing"), processed_dir=str(tmp_path / "p"))
    with pytest.raises(DataError, match="input.txt: missing; run the download stage"):
        tokenize_corpus(cfg, "char")


def test_tokendata_rejects_truncated_or_missing_bins(tmp_path, raw_dir):
    out = tmp_path / "processed"
    tokenize_corpus(DataConfig(raw_dir=str(raw_dir), processed_dir=str(out)), "char")
    b = (out / "val.bin").read_bytes()
    (out / "val.bin").write_bytes(b[:-3])  # an odd byte count too
    with pytest.raises(DataError, match=r"val\.bin: .* tokens, meta\.json says .*re-run the tokenize stage"):
        TokenData.load(out)
    ids = np.frombuffer(b, dtype=np.uint16).copy()
    ids[5] = 65_000  # right size, impossible id (char vocabulary: 66 ids)
    (out / "val.bin").write_bytes(ids.tobytes())
    with pytest.raises(DataError, match=r"val\.bin: token id 65000 is outside the vocabulary \[0, 66\)"):
        TokenData.load(out)
    (out / "val.bin").unlink()
    with pytest.raises(DataError, match=r"val\.bin: missing"):
        TokenData.load(out)
    with pytest.raises(DataError, match="meta.json: missing; run the tokenize stage"):
        TokenData.load(tmp_path / "elsewhere")


# -- batches -----------------------------------------------------------------------------

def test_batch_sampler_windows_and_targets():
    tokens = torch.arange(100)
    s = BatchSampler(tokens, block_size=8, batch_size=64, seed=0)
    for _ in range(20):
        x, y = s.next()
        assert x.shape == y.shape == (64, 8)
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:, -1], x[:, -1] + 1)  # consecutive ids: windows are contiguous
        assert int(x.min()) >= 0 and int(y.max()) <= 99
    # The last possible window is reachable and nothing beyond it.
    s = BatchSampler(torch.arange(9), block_size=8, batch_size=4, seed=0)
    x, y = s.next()
    assert torch.equal(x, torch.arange(8).expand(4, 8)) and torch.equal(y, torch.arange(1, 9).expand(4, 8))


def test_batch_sampler_state_round_trip_replays_batches():
    tokens = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(1))
    a = BatchSampler(tokens, block_size=16, batch_size=4, seed=7)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    first = [a.next() for _ in range(5)]
    # Restoring into the same sampler and into a fresh one (different seed) both replay.
    a.load_state_dict(state)
    again = [a.next() for _ in range(5)]
    b = BatchSampler(tokens, block_size=16, batch_size=4, seed=999)
    b.load_state_dict(state)
    fresh = [b.next() for _ in range(5)]
    for (x1, y1), (x2, y2), (x3, y3) in zip(first, again, fresh):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x1, x3) and torch.equal(y1, y3)
    # Same seed -> same stream; a different seed -> a different one.
    c, d = BatchSampler(tokens, 16, 4, seed=7), BatchSampler(tokens, 16, 4, seed=8)
    a2 = BatchSampler(tokens, 16, 4, seed=7)
    assert torch.equal(c.next()[0], a2.next()[0])
    assert not torch.equal(BatchSampler(tokens, 16, 4, seed=7).next()[0], d.next()[0])


def test_too_short_split_is_a_data_error():
    with pytest.raises(DataError, match=r"split has 16 tokens, fewer than block_size \+ 1 = 17"):
        BatchSampler(torch.arange(16), block_size=16, batch_size=2, seed=0)
    BatchSampler(torch.arange(17), block_size=16, batch_size=2, seed=0).next()


def test_http_404_fails_at_once_without_retrying(tmp_path, server):
    """A client error cannot get better by waiting: one request, a message with the status."""
    sources = {"input.txt": Source(server.url("no-such-file.txt"), SOURCES["input.txt"].sha256)}
    with pytest.raises(DataError) as info:
        fetch_sources(tmp_path / "raw", sources, retries=3, timeout_s=10.0)
    msg = str(info.value)
    assert "HTTP 404" in msg and server.url("no-such-file.txt") in msg and "not retried" in msg
    assert server.hits["no-such-file.txt"] == 1
    assert not (tmp_path / "raw" / "input.txt").exists()


@pytest.mark.parametrize("content, match", [
    ("{not json", r"meta\.json: not valid JSON"),
    ("[1, 2]", r"meta\.json: expected a JSON object"),
    ('{"dtype": "uint16"}', r"meta\.json: 'vocab_size' is missing or not a int"),
    (None, r"meta\.json: dtype 'float64' is not uint16 or uint32"),
])
def test_corrupt_meta_json_is_a_data_error(tmp_path, raw_dir, content, match):
    out = tmp_path / "processed"
    meta = tokenize_corpus(DataConfig(raw_dir=str(raw_dir), processed_dir=str(out)), "char")
    text = json.dumps({**meta, "dtype": "float64"}) if content is None else content
    (out / "meta.json").write_text(text)
    with pytest.raises(DataError, match=match) as info:
        TokenData.load(out)
    assert "re-run the tokenize stage" in str(info.value)


def _local(path: Path, out: Path) -> DataConfig:
    """A config whose one source is the local file ``path``."""
    return DataConfig(raw_dir=str(out.parent / "raw_unused"), processed_dir=str(out),
                      sources=(CorpusSource(path=str(path)),))


@pytest.mark.parametrize("content, match", [
    (b"", r"input\.txt: the corpus is empty"),
    (b"  \n\n", r"input\.txt: the corpus is empty"),
    (b"caf\xc3\xa9 ok, then \xff here", r"input\.txt: not valid UTF-8 at byte 15 \(invalid start byte, byte 0xff\)"),
    (b"x", r"input\.txt: 1 characters leave an empty train split"),
])
def test_bad_corpus_is_a_clear_error_and_writes_nothing(tmp_path, content, match):
    raw, out = tmp_path / "raw", tmp_path / "processed"
    raw.mkdir()
    (raw / "input.txt").write_bytes(content)
    with pytest.raises(DataError, match=match):
        tokenize_corpus(_local(raw / "input.txt", out), "char")
    assert not out.exists()


def test_crlf_line_ends_are_kept(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "processed"
    raw.mkdir()
    text = "first line\r\nsecond line\r\n" * 20
    (raw / "input.txt").write_bytes(text.encode())
    tokenize_corpus(_local(raw / "input.txt", out), "char")
    data = TokenData.load(out)
    assert "\r" in data.tokenizer.chars
    assert data.tokenizer.decode(data.train.tolist()) + data.tokenizer.decode(data.val.tolist()) == text
