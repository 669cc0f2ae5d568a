"""Which arithmetic a run uses: `--precision auto | fp32 | bf16`.

bf16 autocast pays off only where the hardware has native bf16 matrix instructions: every CUDA GPU
this project targets, and CPUs with AVX512-BF16 or AMX; elsewhere bf16 is emulated (cclnb runs it
at about fp32 speed, `bf16_kernels`) and gains nothing over fp32. Even a native CPU is not always
faster under bf16: on this project's Intel AMX machine, ResNet-18 with the ImageNet stem at 32 px (8 px at the first block: small convolutions,
where autocast's casts and oneDNN's layout changes dominate) runs a forward+backward at 0.6-0.7x its
fp32 speed, while the 3x3 stem (32 px at the first block) runs 1.6-1.8x faster
(benchmarks/bench-cpu-xeon-amx-resnet18-*-32px.md).
So `auto` on such a CPU takes bf16 only where the first residual block sees at least
`BF16_MIN_FIRST_BLOCK_PX` pixels: a fixed rule of the model's shape, not a timing, so the same
config resolves the same way in every process (the measured alternative flipped between the two
ranks of a torchrun job and between a run and its rerun). The run's config records the resolved
choice (never "auto"), so a report always says what arithmetic produced its numbers, and a resume
keeps it.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

from cclnb.config import STEM_DOWNSAMPLING, resolve_stem
from cclnb.errors import ConfigError
from cclnb.training.bf16_kernels import rounded_fp32_autocast

PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags of x86 CPUs that execute bf16 dot products natively
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where the file is absent)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def native_bf16_flags() -> list[str]:
    """Which of the native-bf16 flags this CPU advertises (none where /proc/cpuinfo is absent)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU advertises AVX512-BF16 or AMX-BF16."""
    return bool(native_bf16_flags())


def cpu_model() -> str:
    """The CPU's model name, for benchmark headers: the same code is 4x apart on two x86 CPUs here."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def emulates_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether `precision` (resolved) is bf16 on a CPU without native bf16: where `autocast` runs
    cclnb's emulation, the note says so and the bench measures that product."""
    return precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16()


def cpu_bf16_arithmetic() -> str:
    """How this CPU computes bf16 autocast, for a record's hardware: "native (<flags>)", or the
    emulation `autocast` uses where the CPU lacks it; a CPU model name alone does not tell (AMD
    EPYC cores of both kinds made this project's records)."""
    flags = native_bf16_flags()
    return f"native ({' '.join(flags)})" if flags else "emulated: fp32 kernels on bf16-rounded operands"


# Where bf16 is emulated: torch's fallback kernels ran the CPU presets' model 15x slower than fp32
# (2 AMD EPYC cores with AVX2 only; MoCo step 14.2 img/s against 212, CCL 6.3 against 88, commit
# 2624d9a); cclnb runs those ops as fp32 kernels on bf16-rounded operands instead (bf16_kernels.py),
# measured in this benchmark.
EMULATED_BF16_BENCHMARK = "benchmarks/bench-cpu-epyc-avx2-resnet18-w16-cifar-32px.md"


def emulated_bf16_note(precision: str, device: torch.device | str) -> str | None:
    """A note for a run that asks for bf16 on a CPU that only emulates it, else None.

    Why: `auto` never picks bf16 there, but a preset pins bf16 so that records from several
    machines average (the CPU presets, the demo). Such a run computes bf16 arithmetic with fp32
    kernels (`autocast`), which gives bf16's numbers up to the order of fp32 sums but not bit for
    bit those of a native CPU, and the log should say which arithmetic made its numbers."""
    if not emulates_bf16(precision, device):
        return None
    return (f"note: precision bf16 on a CPU without native bf16 ({cpu_model()}: no AVX512-BF16 or AMX): "
            f"convolutions and matrix products run as fp32 kernels on bf16-rounded operands, their "
            f"outputs rounded to bf16 (about fp32 speed, {EMULATED_BF16_BENCHMARK}): bf16 arithmetic "
            f"up to the order of fp32 sums, not bit for bit a native CPU's numbers; for fp32 numbers "
            f"choose --precision fp32 (in a study -p precision=fp32 with --study NAME of its own, since "
            f"fp32 records are not averaged with bf16 ones)")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The flag rule: `auto` -> "bf16" on CUDA and on CPUs with native bf16, else "fp32"; others
    pass through. Runs use `resolve_model_precision`, which also weighs the model's shape on CPUs."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device_type = torch.device(device).type
    if device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


# bf16 autocast pays on a native-bf16 CPU only for convolutions on large enough maps. Measured on
# an AMX Xeon, ResNet-18 at 32 px, forward+backward, bf16 against fp32 speed: first block at 8 px
# (ImageNet stem) 0.6-0.7x, at 16 px (`cifar_pool`) 1.0x, at 32 px (3x3 stem) 1.6-1.9x; on the AMD
# EPYC cores of earlier sessions the ImageNet stem was also slower in bf16 and the 3x3 stem 3x faster.
BF16_MIN_FIRST_BLOCK_PX = 32


def first_block_px(image_size: int, stem: str, small_images: bool) -> int:
    """The side of the map the first residual block sees (the stem's downsampling applied)."""
    return image_size // STEM_DOWNSAMPLING[resolve_stem(stem, small_images)]


def resolve_model_precision(precision: str, device: torch.device | str, stem: str, small_images: bool,
                            image_size: int) -> str:
    """`resolve_precision` for a ResNet of this stem and input size: on a native-bf16 CPU, `auto`
    is bf16 only where the first residual block sees at least `BF16_MIN_FIRST_BLOCK_PX` pixels."""
    if precision != "auto" or torch.device(device).type != "cpu" or not cpu_has_native_bf16():
        return resolve_precision(precision, device)
    return "bf16" if first_block_px(image_size, stem, small_images) >= BF16_MIN_FIRST_BLOCK_PX else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `precision` resolves to bf16, else a no-op context. On a CPU
    without native bf16 the matrix ops run as fp32 kernels on bf16-rounded operands
    (`bf16_kernels`): torch's own emulation computes the same arithmetic 15x slower."""
    resolved = resolve_precision(precision, device)
    if emulates_bf16(resolved, device):
        return rounded_fp32_autocast()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolved == "bf16")
