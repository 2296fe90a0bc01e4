"""Atomic writes and sha256 helpers."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from gptcore import io as gio
from gptcore.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    copy_dir,
    recover_dir,
    sha256_bytes,
    sha256_file,
)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_write_and_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_write_json(tmp_path / "sub" / "c.json", {"x": [1, 2]})  # creates the parent
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "sub" / "c.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.json"]


def test_atomic_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails after the temp file was created
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """mkstemp/mkdtemp create 0600/0700; outputs must be as readable as a plain open()'s."""
    atomic_write_text(tmp_path / "f.txt", "x")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "g").write_text("y")
    assert mode(tmp_path / "f.txt") == 0o666 & ~umask()
    assert mode(tmp_path / "d") == 0o777 & ~umask()


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_checkpoint_files_follow_the_umask(tmp_path, mask):
    """safetensors writes its file 0600: a checkpoint's weights must be as readable as its
    config.json (teammates, a server running as another user), under any umask."""
    import torch

    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import GPTConfig
    from gptcore.data.tokenizer import CharTokenizer
    from gptcore.io import copy_dir
    from gptcore.model import GPT

    old = os.umask(mask)
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4))
        save_checkpoint(tmp_path / "ckpt", model, CharTokenizer(list("abc")), trainer_state={"step": 1})
        copy_dir(tmp_path / "ckpt", tmp_path / "published")
    finally:
        os.umask(old)
    for d in ("ckpt", "published"):
        files = {p.name: mode(p) for p in (tmp_path / d).iterdir()}
        assert "model.safetensors" in files and "trainer_state.pt" in files
        assert files == dict.fromkeys(files, 0o666 & ~mask), files
        assert mode(tmp_path / d) == 0o777 & ~mask


def test_atomic_dir_replaces_the_old_directory(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "one").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "two").write_text("2")
    assert [p.name for p in target.iterdir()] == ["two"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_error_in_body_keeps_the_old_directory(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "one").write_text("1")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "two").write_text("2")
            raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["one"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_recover_dir(tmp_path):
    target, old = tmp_path / "out", tmp_path / "out.old"
    old.mkdir()
    (old / "f").write_text("old")
    assert recover_dir(target) == target
    assert (target / "f").read_text() == "old" and not old.exists()
    old.mkdir()  # both present: the complete new one wins, nothing is moved
    recover_dir(target)
    assert (target / "f").read_text() == "old" and old.exists()


def test_a_second_crash_cannot_lose_the_only_complete_copy(tmp_path, monkeypatch):
    """After a crash between the renames only <out>.old is complete; a save that then
    fails at its own final rename must not have deleted it."""
    target, old = tmp_path / "out", tmp_path / "out.old"
    old.mkdir()
    (old / "f").write_text("previous")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp"):  # the new directory's rename into place
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(gio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("new")
    monkeypatch.undo()
    assert (recover_dir(target) / "f").read_text() == "previous"


def test_copy_dir_replaces_the_destination_with_a_full_copy(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.bin").write_bytes(b"b")
    dst.mkdir()
    (dst / "stale").write_text("x")
    copy_dir(src, dst)
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["a.txt", "sub", "sub/b.bin"]
    assert (dst / "sub" / "b.bin").read_bytes() == b"b"


def test_sha256_helpers(tmp_path, mirror_dir):
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_bytes(b"") == hashlib.sha256(b"").hexdigest()
    data = os.urandom((1 << 20) * 2 + 17)  # spans the 1 MiB read blocks
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    sums = dict(line.split()[::-1] for line in (mirror_dir / "SHA256SUMS").read_text().splitlines())
    for name, digest in sums.items():
        assert sha256_file(mirror_dir / name) == digest
