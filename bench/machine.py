"""What a benchmark ran on: CPU model and the flags that decide bf16 speed, torch, threads."""

from __future__ import annotations

import platform


def describe(device: str = "cpu") -> dict:
    import torch

    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
            "cpu": platform.processor() or platform.machine(), "amx": False, "avx512_bf16": False}
    try:
        text = open("/proc/cpuinfo").read()
        names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        field = lambda key: next((line.split(":", 1)[1].strip() for line in text.splitlines()  # noqa: E731
                                  if line.split(":", 1)[0].strip() == key), "?")
        info.update(cpu=names[0] if names else info["cpu"], cores=len(names),
                    family=field("cpu family"), model=field("model"),
                    amx="amx_tile" in flags, avx512_bf16="avx512_bf16" in flags)
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def headline(info: dict) -> str:
    bf16 = "AMX" if info["amx"] else "AVX-512 bf16, no AMX" if info["avx512_bf16"] else "no bf16 units"
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    family = f"family {info['family']} model {info['model']}, " if "family" in info else ""
    return (f"{info['cpu']} ({family}{info.get('cores', '?')} cores, {bf16}){gpu}; torch {info['torch']}, "
            f"{info['threads']} threads, device {info['device']}")
