"""Which arithmetic a run uses: `--precision auto | fp32 | bf16`.

bf16 autocast pays off only where the hardware has native bf16 matrix instructions: every CUDA GPU
this project targets, and CPUs with AVX512-BF16 or AMX. There it is 3x faster than fp32 on this
project's CPU (ResNet-18 MoCo step, benchmarks/); elsewhere autocast emulates bf16 and is slower
than fp32. `auto` therefore picks bf16 exactly where it is native, and the run's config records the
resolved choice (never "auto"), so a report always says what arithmetic produced its numbers.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from cclnb.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags of x86 CPUs that execute bf16 dot products natively
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU advertises AVX512-BF16 or AMX-BF16 (False where /proc/cpuinfo is absent)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`auto` -> "bf16" on CUDA and on CPUs with native bf16, else "fp32"; others pass through."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device_type = torch.device(device).type
    if device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `precision` resolves to bf16, else a no-op context."""
    resolved = resolve_precision(precision, device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolved == "bf16")
