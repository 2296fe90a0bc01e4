"""``data.sources`` -> documents: every file the corpus is made of, in a fixed order.

Sources are listed in params.yaml as URLs (fetched into ``data.raw_dir`` by the download
stage) and local paths (a file, a directory whose ``*.txt`` files are read recursively,
or a glob). Resolving them touches the filesystem, so it lives here, apart from
:mod:`gptcore.config`'s validation of values; :mod:`gptcore.data.corpus` reads the documents.
Only regular files are documents: anything else is refused by name (see :func:`_regular`).
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig, glob_base, is_glob
from ..errors import DataError
from ..stage import covered


@dataclass
class Document:
    """One file of the corpus."""

    path: Path
    label: str  # how meta.json and errors name it
    source: int  # its index in data.sources
    size: int = 0  # bytes
    chars: int = 0
    sha256: str = ""
    blank: bool = True  # only whitespace (or nothing)


def resolve_documents(cfg: DataConfig) -> list[Document]:
    """Every file of every source, in a deterministic order: sources as listed; a
    directory's ``*.txt`` files (recursively, hidden ones skipped) and a glob's matches
    sorted by path."""
    docs: list[Document] = []
    seen: dict[Path, str] = {}
    for i, src in enumerate(cfg.sources):
        where = f"data.sources[{i}]"
        if src.url:
            path = Path(cfg.raw_dir) / src.file_name
            if not path.is_file():
                raise DataError(f"{path}: missing; run the download stage first ({where}: {src.url})")
            found = [(path, src.file_name)]
        else:
            found = _local_files(src.path, where)
            outputs = {"data.raw_dir": Path(cfg.raw_dir).resolve(),
                       "data.processed_dir": Path(cfg.processed_dir).resolve()}
            for path, label in found:
                inside = [k for k, d in outputs.items() if d in path.resolve().parents]
                if inside:
                    raise DataError(f"{where}.path={src.path!r} matches {label}, inside {inside[0]} (a pipeline "
                                    "output); allowed: sources outside data.raw_dir and data.processed_dir")
        for path, label in found:
            key = path.resolve()
            if key in seen:
                raise DataError(f"{label}: listed twice ({seen[key]} and {where}); "
                                "allowed: each file in one source")
            seen[key] = where
            docs.append(Document(path, label, i))
    return docs


def untracked_sources(cfg: DataConfig, deps: list[str], root: Path) -> list[str]:
    """The local ``path:`` sources no declared dependency covers (a dep equal to the path
    or a directory above it). DVC re-runs the tokenize stage only when a dep changes, so
    an undeclared corpus would be edited without effect."""
    return [src.path for src in cfg.sources if src.path and not covered(glob_base(src.path), deps, root)]


def _local_files(spec: str, where: str) -> list[tuple[Path, str]]:
    root = Path(spec).expanduser()
    if is_glob(spec):
        matches = [Path(m) for m in glob.glob(str(root), recursive=True)]
        files = sorted(p for p in matches if not p.is_dir())
        if not files:
            dirs = f" (only {len(matches)} director{'y' if len(matches) == 1 else 'ies'}: a glob must match " \
                "files, e.g. dir/*.txt)" if matches else ""
            raise DataError(f"{where}.path={spec!r}: the glob matches no file{dirs}")
        return [(p, str(p)) for p in files if _regular(p, str(p), where)]
    if root.is_dir():
        files = sorted((p for p in root.rglob("*.txt")
                        if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                       key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise DataError(f"{where}.path={spec!r}: the directory holds no *.txt file")
        labels = [f"{spec.rstrip('/')}/{p.relative_to(root).as_posix()}" for p in files]
        return [(p, label) for p, label in zip(files, labels) if _regular(p, label, where)]
    if os.path.lexists(root) and _regular(root, spec, where):
        return [(root, spec)]
    raise DataError(f"{where}.path={spec!r}: no such file or directory (relative paths start at "
                    f"{Path.cwd()}); allowed: a file, a directory of *.txt files, or a glob")


def _regular(path: Path, label: str, where: str) -> bool:
    """True for a regular file (links followed); anything else is refused up front, by name:
    silently skipping it would train on less than listed, and opening a FIFO waits for a
    writer for ever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        kind = {errno.ELOOP: "a symlink loop", errno.ENOENT: "a broken symlink"}.get(
            exc.errno, f"unreadable ({exc.strerror})")
        raise DataError(f"{where}: {label} is {kind}; allowed: regular files (fix or remove it)") from None
    if stat.S_ISREG(mode):
        return True
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    raise DataError(f"{where}: {label} is {kind}; allowed: regular files (copy the text into a file)")
