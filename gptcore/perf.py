"""Process-level performance settings for CPU training.

glibc's malloc serves every block above its mmap threshold with a fresh mmap and
returns it to the kernel on free. A training step allocates and frees large
activation and logit buffers every step, so each step would re-fault every page
of them from the kernel (page faults and zeroing, on one core). Disabling mmap
for allocations and raising the trim threshold keeps that memory in the process
heap for reuse. It only affects this process and only glibc; measure with
bench/bench_train.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Tell glibc to keep freed blocks up to ``threshold_bytes`` for reuse. True if applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0)) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(threshold_bytes)) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
