"""Where a run executes and at what precision: device choice, autocast, CPU allocator.

Kept apart from the training loop so evaluation, sampling and the CLI use the same
choices without importing the trainer.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import torch

from ..errors import ConfigError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks cuda > mps > cpu; under torchrun each rank takes ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available; use auto or cpu")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(f"process LOCAL_RANK={local_rank} has no GPU: {count} visible; start at "
                              f"most {count} processes per node, or set train.device: cpu")
        return torch.device("cuda", local_rank)
    if name == "mps" and not _mps_available():
        raise ConfigError("train.device=mps but Apple's MPS backend is not available; use auto or cpu")
    return torch.device(name)


def available_devices() -> list[str]:
    """The devices this machine has, as ``torch.device`` names (cuda by index)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        found += ["cuda"] + ([f"cuda:{i}" for i in range(n)] if n <= 4 else [f"cuda:0..cuda:{n - 1}"])
    if _mps_available():
        found.append("mps")
    return found


def check_device(name: str, what: str = "device") -> torch.device:
    """``name`` as a device this machine has, or a ConfigError with the short list of those
    it has (torch's own error for a bad name lists every backend it knows, over 1 KB)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    index = 0 if device is None or device.index is None else device.index
    ok = device is not None and (
        (device.type == "cpu" and index == 0)
        or (device.type == "cuda" and torch.cuda.is_available() and index < torch.cuda.device_count())
        or (device.type == "mps" and _mps_available() and index == 0))
    if not ok:
        raise ConfigError(f"{what} {name!r}: not a device this machine has; allowed: "
                          f"{', '.join(available_devices())}")
    return device


def resolve_precision(device: torch.device, dtype: str) -> tuple[str, str | None]:
    """The autocast dtype ``device`` can run for the configured ``dtype``, and, where that
    differs, one line saying why (the caller prints it).

    Falls back rather than fails, as ``device: auto`` does: the same params.yaml should
    train on a laptop, an old GPU and a new one. float16 needs a gradient scaler, which
    the trainer adds whenever the dtype returned is float16.
    """
    if dtype == "float32":
        return dtype, None
    kind = device.type
    if not torch.amp.is_autocast_available(kind):
        return "float32", f"train.dtype={dtype}: no autocast on {kind}; training in float32"
    if dtype == "bfloat16" and kind == "cpu" and not cpu_has_bf16_kernels():
        # Without oneDNN's bf16 kernels (x86: AVX-512 or AMX; Arm: the BF16 extension)
        # torch's autocast runs reference kernels, many times slower than float32
        # (docs/devices.md). (float16, never a CPU default, is kept as asked: it is how a
        # CPU exercises the gradient scaler.)
        return "float32", (f"train.dtype=bfloat16: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
                           "bfloat16 kernels, so bfloat16 would run ~30x slower; training in float32")
    if dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        # Pre-Ampere GPUs (V100, T4) emulate bf16 slowly; float16 runs on their tensor cores.
        return "float16", (f"train.dtype=bfloat16: {torch.cuda.get_device_name(device)} has no native "
                           "bfloat16; training in float16 with a gradient scaler")
    if dtype == "bfloat16" and kind == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        return "float16", ("train.dtype=bfloat16: MPS needs macOS 14 for bfloat16; training in float16 "
                           "with a gradient scaler")
    return dtype, None


def cpu_has_bf16_kernels() -> bool:
    """Whether this CPU runs bfloat16 matmuls in oneDNN's fast kernels (torch's own check)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    # A torch without the probe: keep the configured dtype, as before the probe existed.
    return True if probe is None else bool(probe())


def describe_machine() -> str:
    """The CPU class CPU numbers depend on: its model, family and model number, the core
    count, and whether training could run in bfloat16 (the default falls back to float32
    without bf16 kernels). Recorded with validation baselines and tagged on MLflow runs."""
    import os
    import platform

    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    dtype = "bfloat16" if cpu_has_bf16_kernels() else "float32 (no bf16 kernels)"
    return (f"{fields.get('model name', platform.machine())} (cpu family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}), {os.cpu_count()} cores, {dtype}")


def autocast(device: torch.device, dtype: str):
    """Matmuls in ``dtype`` under autocast (weights and optimizer state stay fp32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


# glibc's malloc serves every block above its mmap threshold with a fresh mmap and
# returns it to the kernel on free. A training step allocates and frees large
# activation and logit buffers every step, so each step would re-fault every page of
# them from the kernel (page faults and zeroing, on one core). Disabling mmap for
# allocations and raising the trim threshold keeps that memory in the process heap
# for reuse. It only affects this process and only glibc; measure with bench/bench_train.py.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_allocator_tuned = False


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Tell glibc to keep freed blocks up to ``threshold_bytes`` for reuse. True if applied."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0)) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(threshold_bytes)) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok
