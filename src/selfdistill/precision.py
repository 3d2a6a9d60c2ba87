"""The compute dtype a run asks for (`model.dtype`), resolved on the device it runs on.

`auto` is bfloat16 where the hardware computes it natively, float32 elsewhere: on a CUDA GPU that supports it
(`torch.cuda.is_bf16_supported()`), on a CPU whose flags list AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo;
other systems are taken to have neither). Without those instructions a CPU runs bfloat16 matrix products through
conversions, far slower than float32, so `auto` never picks it there.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMPUTE_DTYPES = ("float32", "bfloat16", "auto")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo, or of `cpuinfo` when given); empty where
    there is no such file."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags(cpuinfo) & set(CPU_BF16_FLAGS))


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`model.dtype` (`float32`, `bfloat16` or `auto`) as the torch dtype of the forward passes on `device`."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype: one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_bf16()
    return torch.bfloat16 if native else torch.float32
