"""Which arithmetic a run uses: `--precision auto | fp32 | bf16`.

bf16 autocast pays off only where the hardware has native bf16 matrix instructions: every CUDA GPU
this project targets, and CPUs with AVX512-BF16 or AMX; elsewhere autocast emulates bf16 and is
slower than fp32. Even a native CPU is not always faster under bf16: on this project's Intel AMX
machine, ResNet-18 with the ImageNet stem at 32 px (8 px at the first block: small convolutions,
where autocast's casts and oneDNN's layout changes dominate) runs a forward+backward at 0.6-0.7x its
fp32 speed, while the 3x3 stem (32 px at the first block) runs 1.6-1.8x faster
(benchmarks/bench-cpu-xeon-amx-resnet18-*-32px.md).
So `auto` on such a CPU times one step of the run's own model at both precisions and takes bf16
only when it is at least `BF16_MIN_SPEEDUP` faster. The run's config records the resolved choice
(never "auto"), so a report always says what arithmetic produced its numbers, and a resume keeps it.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cclnb.errors import ConfigError
from cclnb.models import build_backbone

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


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The flag rule: `auto` -> "bf16" on CUDA and on CPUs with native bf16, else "fp32"; others
    pass through. Runs use `resolve_model_precision`, which times the model on such CPUs."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device_type = torch.device(device).type
    if device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


# bf16 must beat fp32 by this factor to be chosen: near a tie, fp32 (the exact arithmetic) wins, and
# timing noise cannot flip the choice from one run to the next.
BF16_MIN_SPEEDUP = 1.1


def faster_precision(seconds: dict[str, float]) -> str:
    """"bf16" if its step time beats fp32's by `BF16_MIN_SPEEDUP`, else "fp32"."""
    return "bf16" if seconds["fp32"] >= BF16_MIN_SPEEDUP * seconds["bf16"] else "fp32"


def time_precisions(step: Callable[[], object], repeats: int = 2,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per call of `step` on the CPU in fp32 and under bf16 autocast; each after one untimed
    call (oneDNN builds its kernels for a shape on the first)."""
    seconds = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            step()
            start = clock()
            for _ in range(repeats):
                step()
            seconds[precision] = (clock() - start) / repeats
    return seconds


@functools.lru_cache(maxsize=16)
def _timed_backbone_choice(arch: str, small_images: bool, stem: str, image_size: int, batch: int,
                           train: bool, threads: int) -> str:
    step = backbone_step(arch, small_images, stem, image_size, batch, train)
    seconds = time_precisions(step)
    choice = faster_precision(seconds)
    print(f"precision auto: {choice} on this CPU ({arch}, stem {stem}, {image_size} px, batch {batch}, "
          f"{'forward+backward' if train else 'forward'}: fp32 {seconds['fp32']:.3f} s, "
          f"bf16 autocast {seconds['bf16']:.3f} s per step)", flush=True)
    return choice


def backbone_step(arch: str, small_images: bool, stem: str, image_size: int, batch: int,
                  train: bool) -> Callable[[], object]:
    """One step of a fresh backbone of the run's shape on random images: forward and backward
    (`train`) or forward only. A fresh network, so the run's weights and BatchNorm statistics are
    never touched by the timing."""
    net = build_backbone(arch, small_images, stem).train(train)
    images = torch.randn(batch, 3, image_size, image_size)

    def step() -> object:
        if not train:
            with torch.no_grad():
                return net(images)
        net.zero_grad(set_to_none=True)
        loss = net(images).float().square().mean()
        loss.backward()
        return loss

    return step


def resolve_model_precision(precision: str, device: torch.device | str, arch: str, small_images: bool,
                            stem: str, image_size: int, batch_size: int, train: bool) -> str:
    """`resolve_precision` for a run of this model: on a native-bf16 CPU, `auto` is bf16 only if one
    step of the model is `BF16_MIN_SPEEDUP` faster under it (timed once per shape and process, a
    few seconds at most). Under torch.distributed every rank would time on its own and could
    disagree, so there the flag rule holds."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if precision != "auto" or torch.device(device).type != "cpu" or distributed or not cpu_has_native_bf16():
        return resolve_precision(precision, device)
    return _timed_backbone_choice(arch, small_images, stem, image_size, min(batch_size, 64), train,
                                  torch.get_num_threads())


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `precision` resolves to bf16, else a no-op context."""
    resolved = resolve_precision(precision, device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolved == "bf16")
