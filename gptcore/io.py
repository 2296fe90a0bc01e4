"""Atomic file and directory writes: a crash mid-write never leaves a half-written output.

Files are written to a temporary sibling, fsynced, then renamed over the target
(rename is atomic on POSIX). Directories are built in a temporary sibling; the old
directory is moved aside (``<name>.old``) before the new one is renamed into place,
so at every instant either the old or the new complete directory exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import GptcoreError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file beside it that replaces
    ``path`` (fsynced) only when the block ends without an exception; otherwise it is
    deleted and ``path`` is untouched. For outputs too big to hold in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would have,
        # so outputs stay readable by whoever could read a normally written file.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _finish_tree(root: Path) -> None:
    """fsync every file, and give each the mode a plain open() would: some writers create
    private files (safetensors writes 0600), which teammates on a shared machine or a
    server running as another user could not read. Outputs follow the user's umask."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the output private
        yield tmp
        _finish_tree(tmp)
        old = path.with_name(path.name + ".old")
        # A crash between the renames of an earlier save leaves only <path>.old: put it
        # back first, or the rmtree below would delete the only complete copy.
        recover_dir(path)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(path: str | Path) -> Path:
    """If a crash hit between the two renames of :func:`atomic_dir`, restore ``<path>.old``."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)
    return path


def current_dir(path: str | Path) -> Path:
    """Where the complete copy of ``path`` is now, without changing anything: ``path``, or
    ``<path>.old`` between the two renames of a save (or after a crash there). Readers use
    this; only a writer (:func:`atomic_dir`) moves ``.old`` back, so a reader never races
    a save in progress."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    return old if not path.exists() and old.exists() else path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_digest(directory: str | Path, prefix: bytes = b"") -> str:
    """sha256 over ``prefix`` and every file under ``directory`` (names and bytes, in name
    order): a directory's content identity, whatever its files' times or the machine."""
    directory = Path(directory)
    digest = hashlib.sha256(prefix)
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix().encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def copy_dir(src: str | Path, dst: str | Path) -> Path:
    """Atomically replace ``dst`` with a copy of directory ``src``."""
    with atomic_dir(dst) as tmp:
        for item in Path(src).iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
            else:
                shutil.copytree(item, tmp / item.name)
    return Path(dst)


def read_json_object(path: str | Path, error: type[GptcoreError], fix: str = "",
                     missing: str = "missing") -> dict:
    """The JSON object in ``path``; anything else (no file, not UTF-8 — e.g. saved as
    UTF-16 by an editor —, not JSON, not an object) is one ``error`` line naming the file
    and ending with ``fix``."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
                    f"{tail}") from None
    except IsADirectoryError:
        raise error(f"{path}: a directory, not a JSON file{tail}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc}){tail}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}{tail}")
    return obj

