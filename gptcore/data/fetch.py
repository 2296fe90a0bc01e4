"""Fetch the pipeline's source files, sha256-verified, into a directory.

Files come from their upstream URLs (:mod:`gptcore.data.sources`) or, when the environment
variable ``GPTCORE_MIRROR`` names a directory, from byte-exact local copies there (for
offline machines and CI). Either way a file streams into a temporary file while it is
hashed and replaces its target only when the sha256 is right, so the destination never
holds a partial or unverified file, and memory stays flat whatever the file's size.

Transient failures (connection errors, timeouts, 5xx, a truncated body) are retried
with exponential backoff; a client error (4xx: a wrong URL, no access) cannot get
better by waiting and fails at once.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from ..errors import DataError
from ..io import atomic_writer, sha256_file
from .sources import SOURCES, Source

MIRROR_ENV = "GPTCORE_MIRROR"


def _download(url: str, timeout_s: float, name: str, out: BinaryIO) -> str:
    """Stream ``url`` into ``out`` (from its start); returns the sha256 of what arrived."""
    out.seek(0)
    out.truncate()
    h, size = hashlib.sha256(), 0
    req = urllib.request.Request(url, headers={"User-Agent": "gptcore"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}",
                  file=sys.stderr, disable=None) as bar:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    if total is not None and size != total:
        # http.client returns a short body without raising when the connection drops;
        # make it a retryable error rather than a misleading sha256 mismatch.
        raise ConnectionError(f"incomplete download: got {size} of {total} bytes")
    return h.hexdigest()


def _fetch_with_retries(url: str, name: str, retries: int, timeout_s: float, out: BinaryIO) -> str:
    delay = 1.0
    for attempt in range(retries + 1):
        try:
            return _download(url, timeout_s, name, out)
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # HTTPError is a URLError: catch it first, or a 404 is "retried"
                raise DataError(f"{name}: download from {url} failed: HTTP {exc.code} {exc.reason}; "
                                "check the URL (not retried: waiting cannot fix a client error)") from None
            error: Exception = exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            error = exc
        if attempt == retries:
            raise DataError(
                f"{name}: download from {url} failed after {retries + 1} attempts: {error}. "
                f"Offline? Set {MIRROR_ENV} to a directory holding byte-exact copies.")
        print(f"download {name}: {error}; retrying in {delay:.0f}s ({attempt + 1}/{retries})",
              file=sys.stderr)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _copy(origin: Path, out: BinaryIO) -> str:
    h = hashlib.sha256()
    with open(origin, "rb") as f:
        while block := f.read(1 << 20):
            out.write(block)
            h.update(block)
    return h.hexdigest()


def fetch_sources(dest: str | Path, sources: Mapping[str, Source] = SOURCES, *,
                  retries: int = 4, timeout_s: float = 60.0,
                  mirror: str | Path | None = None) -> dict[str, str]:
    """Place every source in ``dest`` with its sha256 verified; returns {name: sha256}.

    A file already present with the right hash is kept. A source without a sha256 (only
    where ``data.require_sha256`` allows it) is fetched every time and its hash returned.
    ``mirror`` (default: the ``GPTCORE_MIRROR`` environment variable) takes files from a
    local directory instead of the network.
    """
    dest = Path(dest)
    if mirror is None:
        mirror = os.environ.get(MIRROR_ENV) or None
    fetched = {}
    for name, src in sources.items():
        target = dest / name
        if src.sha256 and target.is_file() and sha256_file(target) == src.sha256:
            fetched[name] = src.sha256
            continue
        # Streamed into a temporary file beside the target (any size, bounded memory); it
        # replaces the target only once its sha256 is right, so nothing half-checked lands.
        with atomic_writer(target) as out:
            if mirror is not None:
                origin = Path(mirror) / name
                if not origin.is_file():
                    raise DataError(f"{name}: not found in mirror directory {mirror} "
                                    f"(set by {MIRROR_ENV}); expected the file {origin}")
                actual = _copy(origin, out)
            else:
                origin = src.url
                actual = _fetch_with_retries(src.url, name, retries, timeout_s, out)
            if src.sha256 and actual != src.sha256:  # unpinned (data.require_sha256: none): reported, kept
                raise DataError(f"{name}: sha256 mismatch for {origin}: got {actual}, expected {src.sha256}; "
                                "nothing was written")
        fetched[name] = actual
    return fetched


def prune(dest: str | Path, keep: Mapping[str, Source]) -> list[str]:
    """Delete the files in ``dest`` that are not ``keep``'s (sources dropped from params):
    ``dest`` persists between runs (dvc.yaml), so the stage itself removes what DVC used to
    clear before running it, and only once every source is in place."""
    removed = []
    for path in sorted(Path(dest).iterdir()):
        if path.name not in keep and (path.is_file() or path.is_symlink()):
            path.unlink()
            removed.append(path.name)
    return removed

