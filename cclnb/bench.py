"""Throughput benchmark: the authors' data path vs cclnb's fast path vs the compute ceiling.

One run, one table, the same model, batch and training step on every row, so the rows compare as
ratios on whatever machine runs it:

1. *authors*: PIL images, torchvision transforms, DataLoader workers (`WorkerFeeder`);
2. *fast path*: the uint8 dataset resident on the device, augmented there per sample
   (`TensorFeeder` + `BatchMoCoV2Augment`), end to end;
3. *ceiling*: pre-augmented batches already on the device, so only the step is timed.

Each row is timed for a MoCo step (Finetuning) and a CCL step (second task: extra queue and
distillation on, teacher forwards), both the trainer's own `train_step`, so the table measures
the code that trains, not a lookalike. Times are wall clocks around `torch.cuda.synchronize()`,
after warm-up steps (cuDNN autotuning, compilation) that are excluded.
"""

from __future__ import annotations

import datetime
import itertools
import math
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

from cclnb import dist, runs
from cclnb.batches import Batch, TensorFeeder, WorkerFeeder, epoch_order
from cclnb.config import ARCHS, TrainConfig
from cclnb.data import load_uint8, open_dataset
from cclnb.errors import ConfigError
from cclnb.trainer import SMALL_IMAGE_MAX, TaskPlan, Trainer

REPLAY_FRACTION = 0.2        # share of replayed ("old") samples per batch in the CCL step
CEILING_BATCHES = 4          # distinct pre-augmented batches cycled through for the ceiling rows
STEP_KINDS = {"MoCo": "Finetuning", "CCL": "CCL"}


@dataclass
class BenchOptions:
    """What `cclnb bench` measures (the CLI flags)."""

    device: str = "auto"
    arch: str = "resnet18"
    image_size: int = 32
    batch_size: int = 512
    steps: int = 50
    warmup: int = 3
    precision: str = "auto"     # auto: bf16 on a GPU, fp32 on the CPU (where bf16 autocast is slow)
    data: str = "demo"
    workers: int = 8
    compile: bool = False
    out: str | None = None

    def validate(self) -> None:
        checks = [
            (self.arch in ARCHS, f"--arch {self.arch!r} is unknown; choose one of {', '.join(ARCHS)}"),
            (self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}"),
            (self.batch_size >= 2, f"--batch-size must be >= 2, got {self.batch_size}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.warmup >= 1, f"--warmup must be >= 1 (the first step pays one-time costs), got {self.warmup}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.precision in ("auto", "fp32", "bf16"),
             f"--precision must be auto, fp32 or bf16, got {self.precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class Row:
    """One line of the table: a data path (or ceiling variant) timed with both steps."""

    name: str
    precision: str
    first_batch_s: float | None = None
    img_per_s: dict[str, float] = field(default_factory=dict)   # step kind -> images/s


@dataclass
class BenchResult:
    options: BenchOptions
    device_type: str          # "cuda" | "cpu", where the run happened
    rows: list[Row]
    header: dict[str, str]
    notes: list[str]

    @property
    def ceiling(self) -> Row:
        """The eager ceiling at the chosen precision: the reference every ratio is taken to."""
        return next(r for r in self.rows if r.name.startswith("3."))

    def to_markdown(self) -> str:
        kinds = list(STEP_KINDS)
        lines = [f"# cclnb bench: {self.options.arch}, {self.options.image_size} px, "
                 f"batch {self.options.batch_size}", ""]
        lines += [f"- {key}: {value}" for key, value in self.header.items()]
        cols = ["pipeline", "precision", "first batch (s)"]
        for kind in kinds:
            cols += [f"{kind} img/s", f"{kind} / ceiling"]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in self.rows:
            cells = [row.name, row.precision, "-" if row.first_batch_s is None else f"{row.first_batch_s:.2f}"]
            for kind in kinds:
                speed = row.img_per_s[kind]
                cells += [f"{speed:,.0f}", f"{speed / self.ceiling.img_per_s[kind]:.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[Batch], None], make_batches: Callable[[], Iterator[Batch]], warmup: int,
               steps: int, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(first-batch latency s, images/s): the latency runs from asking for the batches to the first
    one being on the device; the speed counts `steps` batches (data + step) after `warmup`."""
    start = time.perf_counter()
    batches = make_batches()
    first = next(batches)
    _sync(device)
    first_batch_s = time.perf_counter() - start
    step(first)
    for _ in range(warmup - 1):
        step(next(batches))
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    _sync(device)
    return first_batch_s, steps * batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------- the trainer's step
def _config(options: BenchOptions, method: str, precision: str, compile_: bool, loader: str) -> TrainConfig:
    return TrainConfig(
        data=options.data, arch=options.arch, batch_size=options.batch_size, image_size=options.image_size,
        workers=options.workers, method=method, precision=precision, compile=compile_, loader=loader,
        mlp=True, aug_plus=True, cos=True, moco_t=0.2, seed=0, progress=False, n_tasks=1,
        key_bn_groups=math.gcd(options.batch_size, TrainConfig.key_bn_groups),
        device=options.device, eval_each_task="none")


class StepFactory:
    """One trainer per (step kind, precision, compile), built on first use and kept: the trainer
    owns the model, optimizer, queues and method, and its `train_step` is what is timed."""

    def __init__(self, options: BenchOptions, images: np.ndarray, ctx: dist.DistContext, run_dir: Path) -> None:
        self.options, self.images, self.ctx, self.run_dir = options, images, ctx, run_dir
        self.generator = torch.Generator(device=ctx.device).manual_seed(0)
        self._steps: dict[tuple[str, str, bool], Callable[[Batch], None]] = {}

    def get(self, kind: str, precision: str, compile_: bool = False) -> Callable[[Batch], None]:
        key = (kind, precision, compile_)
        if key not in self._steps:
            self._steps[key] = self._build(kind, precision, compile_)
        return self._steps[key]

    def _build(self, kind: str, precision: str, compile_: bool) -> Callable[[Batch], None]:
        config = _config(self.options, STEP_KINDS[kind], precision, compile_, "tensor")
        ids = np.arange(len(self.images))
        plan = TaskPlan(task_classes=[np.arange(1)], task_ids=[ids], n_classes=1)
        trainer = Trainer(config, self.images, plan, self.run_dir, self.ctx,
                          runs.TrainLog(self.run_dir, enabled=False), evaluator=None)
        trainer.model.train()
        if kind == "CCL":       # the second task: teacher and extra queue exist, both losses on
            trainer.task = 1
            trainer.method.on_task_start(1)
            trainer.method.on_epoch_start(1, 0)
        return lambda batch: trainer.train_step(batch, self.generator)


# ---------------------------------------------------------------------------- the run
def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() + (" (+ local changes)" if dirty.stdout.strip() else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_bench(options: BenchOptions, command: str = "cclnb bench") -> BenchResult:
    """Measure every row and return the table (see the module docstring for the rows)."""
    options.validate()
    ctx = dist.DistContext(rank=0, world_size=1, local_rank=0, device=dist.resolve_device(options.device))
    device = ctx.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    small = options.image_size <= SMALL_IMAGE_MAX
    blur = not small
    dataset = open_dataset(options.data, "train")
    n_batches = options.warmup + options.steps
    n_needed = n_batches * options.batch_size
    n_unique = min(n_needed, len(dataset))
    # Entries cycle through the first n_unique images, in the trainer's shuffled order.
    entry_ids = np.arange(n_needed) % n_unique
    is_old = np.random.default_rng(0).random(n_needed) < REPLAY_FRACTION
    entries = (entry_ids, is_old)
    order = epoch_order(n_needed, 0, 0, 0)
    batch_generator = torch.Generator(device=device).manual_seed(1)

    start = time.perf_counter()
    images = load_uint8(dataset, ids=np.arange(n_unique), progress=True)
    load_s = time.perf_counter() - start

    def worker_batches() -> Iterator[Batch]:
        feeder = WorkerFeeder(dataset, options.image_size, blur, small, options.workers, device)
        return feeder.batches(entries, order, options.batch_size, 0, 1, 0, batch_generator)

    def tensor_batches() -> Iterator[Batch]:
        feeder = TensorFeeder(images, np.arange(n_unique), options.image_size, blur, small, device)
        return feeder.batches(entries, order, options.batch_size, 0, 1, 0, batch_generator)

    prepared = list(itertools.islice(tensor_batches(), CEILING_BATCHES))

    def ceiling_batches() -> Iterator[Batch]:
        return itertools.cycle(prepared)

    main = options.precision if options.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    other = "fp32" if main == "bf16" else "bf16"
    plan: list[tuple[Row, Callable[[], Iterator[Batch]], str, bool]] = [
        (Row(f"1. authors: PIL + torchvision + DataLoader ({options.workers} workers)", main),
         worker_batches, main, False),
        (Row("2. cclnb fast path: uint8 on device + BatchMoCoV2Augment", main), tensor_batches, main, False),
        (Row("3. ceiling: pre-augmented batches on device", main), ceiling_batches, main, False),
    ]
    if device.type == "cuda":   # the precision comparison is only informative on a GPU
        plan.append((Row("3. ceiling, other precision", other), ceiling_batches, other, False))
    if options.compile:
        plan.append((Row("2. fast path, torch.compile", main), tensor_batches, main, True))
        plan.append((Row("3. ceiling, torch.compile", main), ceiling_batches, main, True))

    with tempfile.TemporaryDirectory(prefix="cclnb-bench-") as tmp:
        steps = StepFactory(options, images[:options.batch_size], ctx, Path(tmp))
        jobs = [(row, make, precision, compile_, kind) for row, make, precision, compile_ in plan
                for kind in STEP_KINDS]
        for row, make, precision, compile_, kind in tqdm(jobs, desc="bench", unit="row"):
            first_s, speed = time_steps(steps.get(kind, precision, compile_), make, options.warmup,
                                        options.steps, options.batch_size, device)
            row.img_per_s[kind] = speed
            if kind == "MoCo" and make is not ceiling_batches:
                row.first_batch_s = first_s
        aug_speed = _augmentation_speed(tensor_batches, options, device)

    rows = [row for row, *_ in plan]
    header = {
        "command": f"`{command}`",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": _device_name(device),
        "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                    f"python {platform.python_version()}",
        "commit": _git_commit(),
        "data": f"{dataset.name} ({len(dataset)} images; {n_unique} used, native "
                f"{dataset.image_size or 'mixed'} px)",
        "timing": f"{options.steps} steps per cell after {options.warmup} warm-up steps, wall clock "
                  f"with device synchronization; MoCo = Finetuning step, CCL = second-task step "
                  f"({REPLAY_FRACTION:.0%} replayed samples)",
    }
    notes = [
        "first batch: from asking for batches to the first one on the device (worker start-up, "
        "or upload of the uint8 array and the first augmentation), MoCo pass",
        f"uint8 array of {n_unique} images: {load_s:.2f} s to decode or read from the cache (once per dataset)",
        f"BatchMoCoV2Augment alone (q, k and anchor views, no step): {aug_speed:,.0f} img/s",
        "ratios are to row 3 (eager ceiling at the chosen precision)",
    ]
    return BenchResult(options, device.type, rows, header, notes)


def _augmentation_speed(make_batches: Callable[[], Iterator[Batch]], options: BenchOptions,
                        device: torch.device) -> float:
    """Images/s of the fast path's data alone (both MoCo views and the anchor), no model."""
    _, speed = time_steps(lambda batch: None, make_batches, options.warmup, options.steps,
                          options.batch_size, device)
    return speed


def default_out(options: BenchOptions, device_type: str) -> Path:
    return Path("benchmarks") / f"bench-{device_type}-{options.arch}-{options.image_size}px.md"


def write_table(result: BenchResult, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.to_markdown(), encoding="utf-8")
    return out
