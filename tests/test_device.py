"""Device choice (gptcore/training/device.py). This machine has no GPU, so which accelerators
exist is simulated: what is tested is the selection logic, not the hardware."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from gptcore.errors import ConfigError
from gptcore.training.device import cpu_has_bf16_kernels, resolve_device, resolve_precision


@pytest.fixture
def machine(monkeypatch):
    """Set which accelerators the process sees: machine(cuda=2, mps=False)."""
    def set_(cuda: int = 0, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return set_


@pytest.mark.parametrize("cuda, mps, expected", [
    (0, False, "cpu"), (0, True, "mps"), (1, True, "cuda:0"), (2, False, "cuda:0"),
])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert str(resolve_device("auto")) == expected
    assert str(resolve_device("cpu")) == "cpu"  # an explicit cpu always wins


def test_each_torchrun_rank_takes_its_local_gpu(machine):
    machine(cuda=2)
    assert str(resolve_device("auto", local_rank=1)) == "cuda:1"
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=2 has no GPU: 2 visible.*train.device: cpu"):
        resolve_device("cuda", local_rank=2)


def test_asking_for_an_absent_accelerator_is_a_clear_error(machine):
    machine(cuda=0, mps=False)
    with pytest.raises(ConfigError, match="train.device=cuda but no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="train.device=mps but Apple's MPS backend is not available"):
        resolve_device("mps")


# -- precision: what the device can run ---------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_cpu_with_bf16_kernels_runs_every_precision_as_asked(monkeypatch, dtype):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert resolve_precision(torch.device("cpu"), dtype) == (dtype, None)


def test_a_cpu_without_bf16_kernels_trains_bf16_in_float32_saying_so(monkeypatch):
    # An AVX2-only CPU (e.g. an EPYC Zen 3): torch's autocast would run reference kernels.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    got, note = resolve_precision(torch.device("cpu"), "bfloat16")
    assert got == "float32"
    assert note.startswith("train.dtype=bfloat16: this CPU (") and note.endswith("training in float32")
    assert resolve_precision(torch.device("cpu"), "float32") == ("float32", None)
    # float16 stays as asked: the CPU's way to exercise the gradient scaler.
    assert resolve_precision(torch.device("cpu"), "float16") == ("float16", None)


def test_the_kernel_probe_agrees_with_this_cpus_flags():
    # oneDNN's bf16 path needs AVX-512 (BW/VL/DQ), AMX or AVX2-VNNI-2 (AVX-NE-CONVERT) on
    # x86; an AVX2-only CPU such as an EPYC Zen 3 has none of them.
    flags = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not flags.exists():
        pytest.skip("reads x86 CPU flags from /proc/cpuinfo")
    have = set(next(line for line in flags.read_text().splitlines() if line.startswith("flags")).split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= have or "amx_bf16" in have:
        assert cpu_has_bf16_kernels()
    if not have & {"avx512f", "amx_bf16", "avx_ne_convert"}:
        assert not cpu_has_bf16_kernels()


def test_gpu_without_native_bf16_falls_back_to_float16_saying_so(machine, monkeypatch):
    machine(cuda=1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    dtype, note = resolve_precision(torch.device("cuda", 0), "bfloat16")
    assert dtype == "float16"
    assert note == ("train.dtype=bfloat16: Tesla T4 has no native bfloat16; training in float16 "
                    "with a gradient scaler")
    assert resolve_precision(torch.device("cuda", 0), "float16") == ("float16", None)
    assert resolve_precision(torch.device("cuda", 0), "float32") == ("float32", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere+
    assert resolve_precision(torch.device("cuda", 0), "bfloat16") == ("bfloat16", None)


@pytest.mark.parametrize("macos_14, expected", [(True, "bfloat16"), (False, "float16")])
def test_mps_takes_bf16_only_from_macos_14(monkeypatch, macos_14, expected):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos_14)
    dtype, note = resolve_precision(torch.device("mps"), "bfloat16")
    assert dtype == expected
    assert (note is None) == macos_14
    if note:
        assert note.startswith("train.dtype=bfloat16: MPS needs macOS 14") and "float16" in note
    assert resolve_precision(torch.device("mps"), "float16") == ("float16", None)


def test_a_device_without_autocast_trains_in_float32_saying_so():
    # "meta" is a real torch device with no autocast support.
    for dtype in ("bfloat16", "float16"):
        assert resolve_precision(torch.device("meta"), dtype) == (
            "float32", f"train.dtype={dtype}: no autocast on meta; training in float32")
