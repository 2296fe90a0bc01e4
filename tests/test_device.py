"""Device choice (gptcore/device.py). This machine has no GPU, so which accelerators
exist is simulated: what is tested is the selection logic, not the hardware."""

from __future__ import annotations

import pytest
import torch

from gptcore.device import resolve_device
from gptcore.errors import ConfigError


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
