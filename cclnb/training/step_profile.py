"""Where one training step's time goes: `torch.profiler` over a few steps, as a markdown section.

The bench table says how fast a step runs against the device's matmul peak; when that fraction
is low (the first H200 session measured 11.6% for the MoCo step at 32 px), it cannot say why.
This does, in the one reading that decides what to change next:

- *device busy*: the summed time of the kernels (the device's own self time of every op) per
  step, against the step's wall time. Busy far below wall means the device waits on the host
  (Python, launches, a synchronizing call): fewer, larger launches help (torch.compile, CUDA
  graphs). Busy close to wall means the kernels themselves are slow: the top ops say which
  (BatchNorm and elementwise passes are memory-bound, convolutions compute-bound).
- *top ops*: self time per step and calls per step of the ops that cost most.

On a CPU every op runs on the host, so busy is the ops' summed self time and only the top ops
are informative. Profiling slows a step down; the bench's img/s come from unprofiled steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from cclnb.data.batches import Batch
from cclnb.training.dist import synchronize

TOP_OPS = 15


@dataclass
class StepProfile:
    """One step kind's profile, every time per step in milliseconds."""

    kind: str
    steps: int
    wall_ms: float
    busy_ms: float
    top: list[tuple[str, float, float]]   # (op, self ms per step, calls per step), costliest first


def profile_step(kind: str, step: Callable[[Batch], None], batches: Iterator[Batch], n_steps: int,
                 device: torch.device, top_n: int = TOP_OPS) -> StepProfile:
    """Profile `n_steps` calls of `step` (already warmed up: compilation and cuDNN autotuning are
    not what this looks for) and rank the ops by their self time on the device that runs them."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    todo = [next(batches) for _ in range(n_steps)]
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for batch in todo:
            step(batch)
        synchronize(device)
        wall_s = time.perf_counter() - start

    def self_us(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    events.sort(key=self_us, reverse=True)
    busy_ms = sum(self_us(e) for e in events) / 1e3 / n_steps
    top = [(e.key, self_us(e) / 1e3 / n_steps, e.count / n_steps) for e in events[:top_n]]
    return StepProfile(kind, n_steps, wall_s * 1e3 / n_steps, busy_ms, top)


def profile_markdown(profiles: list[StepProfile], device_type: str) -> str:
    """The section the bench appends to its table: a busy line per step kind, then its top ops."""
    where = "device kernels" if device_type == "cuda" else "host ops"
    lines = ["## Where a step's time goes (torch.profiler, eager ceiling steps, main precision)", ""]
    for p in profiles:
        lines.append(f"- {p.kind} step: {p.wall_ms:.2f} ms wall per step (profiled, {p.steps} steps); "
                     f"{where} busy {p.busy_ms:.2f} ms ({p.busy_ms / p.wall_ms:.0%} of wall)")
    for p in profiles:
        lines += ["", f"| {p.kind}: op | self ms / step | share of busy | calls / step |", "|---|---|---|---|"]
        lines += [f"| `{op}` | {ms:.3f} | {ms / p.busy_ms:.1%} | {calls:g} |" for op, ms, calls in p.top]
    return "\n".join(lines) + "\n"
