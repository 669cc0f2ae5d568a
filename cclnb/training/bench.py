"""Throughput benchmark: the authors' data path vs cclnb's fast path vs the compute ceiling.

One run, one table, the same model, batch and training step on every row, so the rows compare as
ratios on whatever machine runs it:

1. *authors*: PIL images, torchvision transforms, DataLoader workers (`WorkerFeeder`);
2. *fast path*: the uint8 dataset resident on the device, augmented there per sample
   (`TensorFeeder` + `BatchMoCoV2Augment`), end to end;
3. *ceiling*: pre-augmented batches already on the device, so only the step is timed.

`--rows` adds the speed options' candidates (docs/performance.md), each the trainer's own code
path behind its option: the fast path with `--prefetch` (the next batch built on a side stream)
and with `--grouped-bn strided` too, the device JPEG decoder (`--loader decode`, with and without
prefetch), the ceiling with the strided BatchNorm, and the ceiling with plain BatchNorm (one
group: not the authors' statistics, the bound of what the grouping costs).

Each row is timed for a MoCo step (Finetuning) and a CCL step (second task: extra queue and
distillation on, teacher forwards), both the trainer's own `train_step`, so the table measures
the code that trains, not a lookalike. Times are wall clocks around `torch.cuda.synchronize()`,
after warm-up steps (cuDNN autotuning, compilation) that are excluded.

Ratios between rows say how close the data path comes to the step, not how good the step is. For
that the same run also measures the device's own ceiling, a large square matmul at each precision,
and counts the FLOPs one `train_step` really executes (torch's `FlopCounterMode`), so every row
also reads as achieved GFLOP/s and as a fraction of that matmul peak at its precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from cclnb.config import ARCHS, COMPILE_MODES, STEMS, TrainConfig
from cclnb.data import load_uint8, open_dataset
from cclnb.data.batches import Batch, TensorFeeder, WorkerFeeder, epoch_order
from cclnb.data.jpeg import DecodeFeeder
from cclnb.data.prefetch import PrefetchFeeder
from cclnb.errors import ConfigError
from cclnb.training import SMALL_IMAGE_MAX, TaskPlan, Trainer, dist, runs
from cclnb.training.precision import autocast, cpu_model, emulates_bf16, native_bf16_flags, resolve_precision
from cclnb.training.step_profile import profile_markdown, profile_step

REPLAY_FRACTION = 0.2        # share of replayed ("old") samples per batch in the CCL step
PROFILE_STEPS = 5            # profiled ceiling steps per kind (at most --steps; after the timed ones: warm)
CEILING_BATCHES = 4          # distinct pre-augmented batches cycled through for the ceiling rows
STEP_KINDS = {"MoCo": "Finetuning", "CCL": "CCL"}
# --rows: the rows a run measures, by key. The default is the three-row table of every earlier
# run; "all" is every row the data allows (the decode rows need a dataset of image files).
ROW_KEYS = ("authors", "fast", "prefetch", "prefetch-strided", "decode", "decode-prefetch", "ceiling",
            "strided", "plain-bn")
DEFAULT_ROWS = "authors,fast,ceiling"
BENCH_PRECISIONS = ("auto", "fp32", "bf16", "both")     # both: rows 1-3 at the native and the other one
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Side of the square matmuls of the peak measurement: big enough to be compute-bound (2 x 2048^3
# FLOPs take ~0.08 s in fp32 on this project's 2 CPU cores), small enough to cost seconds.
PEAK_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
PEAK_REPEATS = 3


@dataclass
class BenchOptions:
    """What `cclnb bench` measures (the CLI flags)."""

    device: str = "auto"
    arch: str = "resnet18"
    stem: str = "auto"          # one of STEMS (auto: the 3x3 stem for <= 64 px)
    width: int = 64             # channels of the ResNet's first stage (64 = torchvision's)
    image_size: int = 32
    batch_size: int = 512
    steps: int = 50
    warmup: int = 3
    precision: str = "auto"     # auto (cclnb.training.precision's rule) | fp32 | bf16 | both
    data: str = "demo"
    workers: int = 8
    compile: bool = False
    compile_mode: str = "default"   # torch.compile's mode of the compiled rows
    rows: str = DEFAULT_ROWS    # comma-separated ROW_KEYS, or "all"
    profile: bool = False       # append where a step's time goes (cclnb.training.step_profile)
    out: str | None = None

    def row_keys(self) -> list[str]:
        """The rows asked for, in ROW_KEYS' order."""
        asked = set(ROW_KEYS) if self.rows == "all" else {key.strip() for key in self.rows.split(",")}
        return [key for key in ROW_KEYS if key in asked]

    def validate(self) -> None:
        checks = [
            (self.arch in ARCHS, f"--arch {self.arch!r} is unknown; choose one of {', '.join(ARCHS)}"),
            (self.stem in STEMS, f"--stem {self.stem!r} is unknown; choose one of {', '.join(STEMS)}"),
            (self.width >= 1, f"--width must be >= 1, got {self.width}"),
            (self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}"),
            (self.batch_size >= 2, f"--batch-size must be >= 2, got {self.batch_size}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.warmup >= 1, f"--warmup must be >= 1 (the first step pays one-time costs), got {self.warmup}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.precision in BENCH_PRECISIONS,
             f"--precision must be one of {', '.join(BENCH_PRECISIONS)}, got {self.precision!r}"),
            (self.rows == "all" or {k.strip() for k in self.rows.split(",")} <= set(ROW_KEYS),
             f"--rows {self.rows!r}: choose 'all' or a comma-separated list of {', '.join(ROW_KEYS)}"),
            (self.compile_mode in COMPILE_MODES,
             f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"),
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
    reference: bool = False     # the eager ceiling that the "/ ceiling" ratios of its precision use


@dataclass
class BenchResult:
    options: BenchOptions
    device_type: str          # "cuda" | "cpu", where the run happened
    rows: list[Row]
    header: dict[str, str]
    notes: list[str]
    peak_gflops: dict[str, float]       # precision -> measured matmul GFLOP/s
    flops_per_image: dict[str, float]   # step kind -> FLOPs of one train_step per image
    sections: list[str] = field(default_factory=list)   # markdown after the table (the profile)

    def ceiling(self, precision: str) -> Row | None:
        """The eager ceiling at `precision`: the reference of the img/s ratios of that precision's rows
        (None when the run has no ceiling row at that precision)."""
        return next((r for r in self.rows if r.reference and r.precision == precision), None)

    def achieved_gflops(self, row: Row, kind: str) -> float:
        """The row's counted work per second: what "% of peak" divides by the matmul peak."""
        return row.img_per_s[kind] * self.flops_per_image[kind] / 1e9

    def to_markdown(self) -> str:
        """The table. The img/s columns come first and keep their positions (3 and 5 for MoCo and
        CCL), which `benchmarks/plan_epochs.py` reads; the FLOP columns follow."""
        kinds = list(STEP_KINDS)
        stem = "" if self.options.stem == "auto" else f", {self.options.stem} stem"
        stem += "" if self.options.width == 64 else f", width {self.options.width}"
        lines = [f"# cclnb bench: {self.options.arch}{stem}, {self.options.image_size} px, "
                 f"batch {self.options.batch_size}", ""]
        lines += [f"- {key}: {value}" for key, value in self.header.items()]
        cols = ["pipeline", "precision", "first batch (s)"]
        for kind in kinds:
            cols += [f"{kind} img/s", f"{kind} / ceiling"]
        for kind in kinds:
            cols += [f"{kind} GFLOP/s", f"{kind} % of peak"]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        above_peak: dict[str, None] = {}    # precisions whose rows outran their matmul yardstick
        for row in self.rows:      # a cell not measured (yet: the table is written as cells finish) is "-"
            cells = [row.name, row.precision, "-" if row.first_batch_s is None else f"{row.first_batch_s:.2f}"]
            ceiling = self.ceiling(row.precision)
            for kind in kinds:
                speed = row.img_per_s.get(kind)
                reference = None if ceiling is None else ceiling.img_per_s.get(kind)
                cells += ["-" if speed is None else _rate(speed),
                          "-" if speed is None or reference is None else f"{speed / reference:.0%}"]
            for kind in kinds:
                if kind not in row.img_per_s:
                    cells += ["-", "-"]
                    continue
                achieved = self.achieved_gflops(row, kind)
                of_peak = achieved / self.peak_gflops[row.precision]
                if of_peak > 1:
                    above_peak[row.precision] = None
                cells += [_rate(achieved), f"{of_peak:.1%}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {note}" for note in self.notes]
        lines += [f"- % of peak above 100% ({', '.join(above_peak)}): the convolutions ran faster than torch.mm "
                  f"at that precision on this device (a square product can be the slower kernel where the precision "
                  f"has no native one); there the yardstick is slow, not the row fast"] if above_peak else []
        return "\n".join(lines) + "\n" + "".join("\n" + section for section in self.sections)


def _rate(value: float) -> str:
    """Whole numbers with thousands separators, 3 significant digits below 100: a CPU row at
    0.4 img/s must not print as 0."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


# ---------------------------------------------------------------------------- timing
def time_steps(step: Callable[[Batch], None], make_batches: Callable[[], Iterator[Batch]], warmup: int,
               steps: int, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(first-batch latency s, images/s): the latency runs from asking for the batches to the first
    one being on the device; the speed counts `steps` batches (data + step) after `warmup`."""
    start = time.perf_counter()
    batches = make_batches()
    first = next(batches)
    dist.synchronize(device)
    first_batch_s = time.perf_counter() - start
    step(first)
    for _ in range(warmup - 1):
        step(next(batches))
    dist.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    dist.synchronize(device)
    return first_batch_s, steps * batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------- the device's ceiling
@contextlib.contextmanager
def _fp32_matmuls_like_convolutions(device: torch.device) -> Iterator[None]:
    """On CUDA, let fp32 matmuls use TF32 exactly when cuDNN's fp32 convolutions do (torch's
    defaults differ: convolutions yes, matmuls no). A ResNet step is convolutions, so this is the
    fp32 peak its rows can reach; measured without TF32 they could read above 100%."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def matmul_peak_gflops(device: torch.device, precision: str, size: int, repeats: int = PEAK_REPEATS,
                       min_time_s: float = 0.1) -> float:
    """GFLOP/s of `size` x `size` matmuls in `precision` (2 size^3 FLOPs each), best of `repeats`.

    This is the yardstick of the table's "% of peak": what this device's matrix units actually
    deliver in this run (same load, same clocks, same library), not a datasheet number. One
    untimed product pays allocation and kernel selection; then the number of products per timed
    repeat doubles until a repeat lasts `min_time_s`, so a fast GPU is not timed on one launch.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, generator=generator).to(PRECISION_DTYPES[precision])
            for _ in range(2))
    out = torch.empty_like(a)
    if emulates_bf16(precision, device):
        # where bf16 is emulated, the product the steps get: autocast's, through cclnb's kernels
        context, multiply = (lambda: autocast(device, precision)), (lambda: torch.mm(a, b))
    else:
        context, multiply = contextlib.nullcontext, (lambda: torch.mm(a, b, out=out))

    def seconds(n: int) -> float:
        dist.synchronize(device)
        start = time.perf_counter()
        with context():
            for _ in range(n):
                multiply()
        dist.synchronize(device)
        return time.perf_counter() - start

    with _fp32_matmuls_like_convolutions(device):
        seconds(1)
        n = 1
        while (elapsed := seconds(n)) < min_time_s:
            n *= 2
        best = min([elapsed] + [seconds(n) for _ in range(repeats - 1)])
    return 2 * size**3 * n / best / 1e9


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the matrix products and convolutions that `fn()` dispatches,
    backward passes included, as torch's `FlopCounterMode` counts them from the real op shapes.

    Counting the ops that run, rather than typing in a model's FLOPs, keeps the count true when
    the step changes (a skipped forward, a first layer that needs no input gradient). Elementwise
    ops, norms and the optimizer are not counted: they are memory-bound and no matmul peak
    applies to them.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------- the trainer's step
Variant = tuple[tuple[str, object], ...]    # TrainConfig fields a row sets, e.g. (("grouped_bn", "strided"),)


def _config(options: BenchOptions, method: str, precision: str, compile_: bool, loader: str,
            variant: Variant = ()) -> TrainConfig:
    config = TrainConfig(
        data=options.data, arch=options.arch, stem=options.stem, width=options.width, batch_size=options.batch_size,
        image_size=options.image_size, workers=options.workers, method=method, precision=precision,
        compile=compile_, compile_mode=options.compile_mode if compile_ else "default", loader=loader,
        mlp=True, aug_plus=True, cos=True, moco_t=0.2, seed=0, progress=False, n_tasks=1,
        key_bn_groups=math.gcd(options.batch_size, TrainConfig.key_bn_groups),
        bn_groups=math.gcd(options.batch_size, TrainConfig.bn_groups),
        device=options.device, eval_each_task="none")
    return dataclasses.replace(config, **dict(variant))


class StepFactory:
    """One trainer per (step kind, precision, compile, variant), built on first use and kept: the
    trainer owns the model, optimizer, queues and method, and its `train_step` is what is timed.
    A variant is the TrainConfig fields a row changes (its speed option)."""

    def __init__(self, options: BenchOptions, images: np.ndarray, ctx: dist.DistContext) -> None:
        self.options, self.images, self.ctx = options, images, ctx
        self.generator = torch.Generator(device=ctx.device).manual_seed(0)
        self._trainers: dict[tuple[str, str, bool, Variant], Trainer] = {}

    def trainer(self, kind: str, precision: str, compile_: bool = False, variant: Variant = ()) -> Trainer:
        key = (kind, precision, compile_, variant)
        if key not in self._trainers:
            self._trainers[key] = self._build(kind, precision, compile_, variant)
        return self._trainers[key]

    def get(self, kind: str, precision: str, compile_: bool = False, variant: Variant = ()
            ) -> Callable[[Batch], None]:
        trainer = self.trainer(kind, precision, compile_, variant)
        return lambda batch: trainer.train_step(batch, self.generator)

    def _build(self, kind: str, precision: str, compile_: bool, variant: Variant) -> Trainer:
        config = _config(self.options, STEP_KINDS[kind], precision, compile_, "tensor", variant)
        ids = np.arange(len(self.images))
        plan = TaskPlan(task_classes=[np.arange(1)], task_ids=[ids], n_classes=1)
        trainer = Trainer(config, self.images, plan, self.ctx)   # no run directory: writes nothing
        # MoCo: the first task. CCL: the second, where the teacher and the extra queue take part,
        # at its second epoch: the teacher then runs in train mode as in every epoch but a task's
        # first (in the first it runs in eval mode and fp32, see docs/performance.md).
        trainer.start_task(1 if kind == "CCL" else 0)
        trainer.epoch = 1 if kind == "CCL" else 0
        trainer.begin_epoch()
        return trainer


def step_flops(steps: StepFactory, batches: list[Batch], precision: str) -> tuple[dict[str, float], float]:
    """(FLOPs per image of a `train_step` of each kind, FLOPs per image of one query-encoder
    forward). A step's work can depend on its batch (the CCL step skips its distillation forwards
    on a batch without replayed rows), so each kind is counted over all of `batches`, the ones the
    ceiling rows cycle through. The counted steps are extra untimed warm-up steps of the trainers;
    the forward is reported so a reader can check a step's count in units of forwards."""
    images = sum(len(batch.q) for batch in batches)
    per_image = {kind: sum(count_flops(lambda: steps.get(kind, precision)(batch)) for batch in batches) / images
                 for kind in STEP_KINDS}
    encoder = steps.trainer("MoCo", precision).model.encoder_q
    with torch.no_grad():
        forward = count_flops(lambda: encoder(batches[0].q)) / len(batches[0].q)
    return per_image, forward


def row_precisions(precision: str, device: torch.device) -> list[str]:
    """The precisions the table has rows for, the device's default (`auto`) first: `both` adds
    the other one, so a single run shows what bf16 buys on this device."""
    if precision != "both":
        return [resolve_precision(precision, device)]
    native = resolve_precision("auto", device)
    return [native, "fp32" if native == "bf16" else "bf16"]


# ---------------------------------------------------------------------------- the run
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    native = "bf16 flags: " + (" ".join(native_bf16_flags()) or "none")
    return f"CPU ({cpu_model()}, {native}, {torch.get_num_threads()} threads)"


@dataclass
class Planned:
    """A row to measure: how its batches are made and which trainer steps them."""

    row: Row
    make: Callable[[], Iterator[Batch]]
    precision: str
    compile_: bool = False
    variant: Variant = ()


STRIDED: Variant = (("grouped_bn", "strided"),)
PLAIN_BN: Variant = (("bn_groups", 1), ("key_bn_groups", 1))


def run_bench(options: BenchOptions, command: str = "cclnb bench",
              on_table: Callable[[BenchResult], None] | None = None,
              on_progress: Callable[[BenchResult], None] | None = None) -> BenchResult:
    """Measure every row and return the table (see the module docstring for the rows).

    `on_progress` (e.g. a writer) gets the table after every measured cell, with "-" where a cell
    is still to come, so that a caller's timeout keeps what was measured; the ceiling rows run
    first (the ratios need them; a compiled ceiling before the compiled fast path) and the
    authors' rows last (their worker start-up varies most).
    With `options.profile` the profile section is measured last and `on_table` first gets the
    table without it."""
    options.validate()
    ctx = dist.DistContext(rank=0, world_size=1, local_rank=0, device=dist.resolve_device(options.device))
    device = ctx.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    small = options.image_size <= SMALL_IMAGE_MAX
    blur = not small
    dataset = open_dataset(options.data, "train")
    keys = options.row_keys()
    notes_before: list[str] = []
    if not callable(getattr(dataset, "read_bytes", None)) and {"decode", "decode-prefetch"} & set(keys):
        keys = [k for k in keys if not k.startswith("decode")]
        notes_before.append(f"decode rows left out: {dataset.name} holds decoded pixels, not image files")
    uint8 = dataset.image_size is not None     # one size: the uint8 array (fast path and ceiling) exists
    if not uint8:
        keys = [k for k in keys if k not in ("fast", "prefetch", "prefetch-strided")]
        notes_before.append("uint8 rows left out: the images differ in size (the ceiling uses decoded batches)")
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
    images = load_uint8(dataset, ids=np.arange(n_unique), progress=True) if uint8 else None
    load_s = time.perf_counter() - start

    def worker_batches() -> Iterator[Batch]:
        feeder = WorkerFeeder(dataset, options.image_size, blur, small, options.workers, device)
        return feeder.batches(entries, order, options.batch_size, 0, 1, 0, batch_generator)

    def tensor_feeder() -> TensorFeeder:
        return TensorFeeder(images, np.arange(n_unique), options.image_size, blur, small, device)

    def decode_feeder() -> DecodeFeeder:
        return DecodeFeeder(dataset, options.image_size, blur, small, device)

    def batches_of(feeder) -> Callable[[], Iterator[Batch]]:
        return lambda: feeder().batches(entries, order, options.batch_size, 0, 1, 0, batch_generator)

    def prefetched(feeder) -> Callable[[], Iterator[Batch]]:
        return batches_of(lambda: PrefetchFeeder(feeder(), device, channels_last=True))

    tensor_batches, decode_batches = batches_of(tensor_feeder), batches_of(decode_feeder)
    prepared = list(itertools.islice((tensor_batches if uint8 else decode_batches)(), CEILING_BATCHES))

    def ceiling_batches() -> Iterator[Batch]:
        return itertools.cycle(prepared)

    precisions = row_precisions(options.precision, device)
    main = precisions[0]
    plan: list[Planned] = []
    for precision in precisions:
        candidates = precision == main      # the options' rows at the main precision only
        rows = {
            "authors": Planned(Row(f"1. authors: PIL + torchvision + DataLoader ({options.workers} workers)",
                                   precision), worker_batches, precision),
            "fast": Planned(Row("2. cclnb fast path: uint8 on device + BatchMoCoV2Augment", precision),
                            tensor_batches, precision),
            "prefetch": Planned(Row("2a. fast path + --prefetch (next batch on a side stream)", precision),
                                prefetched(tensor_feeder), precision),
            "prefetch-strided": Planned(Row("2b. fast path + --prefetch + --grouped-bn strided", precision),
                                        prefetched(tensor_feeder), precision, variant=STRIDED),
            "decode": Planned(Row("2c. device decode: JPEG files + decode_jpeg (--loader decode)", precision),
                              decode_batches, precision),
            "decode-prefetch": Planned(Row("2d. device decode + --prefetch", precision),
                                       prefetched(decode_feeder), precision),
            "ceiling": Planned(Row("3. ceiling: pre-augmented batches on device", precision, reference=True),
                               ceiling_batches, precision),
            "strided": Planned(Row("3a. ceiling + --grouped-bn strided", precision), ceiling_batches, precision,
                               variant=STRIDED),
            "plain-bn": Planned(Row("3b. ceiling, plain BatchNorm (--bn-groups 1 --key-bn-groups 1: not the "
                                    "authors' statistics; what grouping costs)", precision),
                                ceiling_batches, precision, variant=PLAIN_BN),
        }
        plan += [rows[k] for k in keys if candidates or k in ("authors", "fast", "ceiling")]
    if options.compile:
        mode = "" if options.compile_mode == "default" else f" mode={options.compile_mode}"
        if uint8:
            plan.append(Planned(Row(f"2. fast path, torch.compile{mode}", main), tensor_batches, main, True))
        plan.append(Planned(Row(f"3. ceiling, torch.compile{mode}", main), ceiling_batches, main, True))

    peak_size = PEAK_MATMUL_SIZE[device.type]
    peaks = {precision: matmul_peak_gflops(device, precision, peak_size) for precision in precisions}
    steps = StepFactory(options, images[:options.batch_size] if uint8 else
                        np.zeros((options.batch_size, 1, 1, 3), np.uint8), ctx)   # its own feeder is never used
    flops, forward_flops = step_flops(steps, prepared, main)
    rows = [planned.row for planned in plan]
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    header = {
        "command": f"`{command}`",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": _device_name(device),
        "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                    f"python {platform.python_version()}",
        "commit": runs.short_commit(runs.git_commit(), 12),
        "data": f"{dataset.name} ({len(dataset)} images; {n_unique} used, native "
                f"{dataset.image_size or 'mixed'} px)",
        "timing": f"{options.steps} steps per cell after {options.warmup} warm-up steps, wall clock "
                  f"with device synchronization; MoCo = Finetuning step, CCL = second-task step "
                  f"({REPLAY_FRACTION:.0%} replayed samples)",
        "matmul peak": ", ".join(f"{p} {_rate(peaks[p])} GFLOP/s" for p in precisions)
                       + f" (torch.mm of {peak_size} x {peak_size}, measured in this run, best of {PEAK_REPEATS}"
                       + ("; fp32 with TF32, as cuDNN's convolutions)" if tf32 else ")"),
        "FLOPs per image": ", ".join(f"{kind} step {flops[kind] / 1e9:.2f} GFLOP "
                                     f"(= {flops[kind] / forward_flops:.1f} forwards)" for kind in STEP_KINDS)
                           + f"; one query-encoder forward {forward_flops / 1e9:.2f} GFLOP (FlopCounterMode "
                             f"over train_steps on the {CEILING_BATCHES} ceiling batches, forward and backward)",
    }
    notes = [
        "first batch: from asking for batches to the first one on the device (worker start-up, "
        "or upload of the uint8 array and the first augmentation, or the first files decoded), MoCo pass",
        *notes_before,
        *([f"uint8 array of {n_unique} images: {load_s:.2f} s to decode or read from the cache (once per dataset)"]
          if uint8 else []),
        "/ ceiling: img/s as a fraction of row 3 (eager ceiling) at the row's precision",
        "GFLOP/s: FLOPs per image x img/s; % of peak: that over the matmul peak at the row's precision "
        "(matmuls and convolutions only; BatchNorm, elementwise ops and the optimizer are extra time "
        "with no FLOPs counted)",
    ]
    result = BenchResult(options, device.type, rows, header, notes, peaks, flops)
    # the eager ceilings first (every ratio needs them), then the other step-only rows (a compile
    # is paid there once, its fast-path row reuses the trainer), the authors' rows last (their
    # worker start-up varies most)
    order_of = {"reference": 0, "step only": 1, "data": 2, "authors": 3}
    todo = sorted(plan, key=lambda p: order_of["reference" if p.row.reference else
                                                "step only" if p.make is ceiling_batches else
                                                "authors" if p.make is worker_batches else "data"])
    jobs = [(planned, kind) for planned in todo for kind in STEP_KINDS]
    for planned, kind in tqdm(jobs, desc="bench", unit="cell"):
        # a compiled ceiling warms up on each of its batches: the CCL step's distillation sees another
        # number of replayed rows in each, and every new size compiles (or records a graph) once
        warmup = (max(options.warmup, CEILING_BATCHES) if planned.compile_ and planned.make is ceiling_batches
                  else options.warmup)
        first_s, speed = time_steps(steps.get(kind, planned.precision, planned.compile_, planned.variant),
                                    planned.make, warmup, options.steps, options.batch_size, device)
        planned.row.img_per_s[kind] = speed
        if kind == "MoCo" and planned.make is not ceiling_batches:
            planned.row.first_batch_s = first_s
        if on_progress is not None:
            on_progress(result)
    data_alone = [("BatchMoCoV2Augment", tensor_batches)] if uint8 and "fast" in keys else []
    data_alone += [("device decode (read, decode_jpeg, crops, colour)", decode_batches)] if "decode" in keys else []
    for name, make in data_alone:
        notes.insert(-2, f"{name} alone (q, k and anchor views, no step): "
                         f"{_augmentation_speed(make, options, device):,.0f} img/s")
    if on_table is not None:
        on_table(result)
    if options.profile:
        n_steps = min(PROFILE_STEPS, options.steps)
        profiled = [(kind, kind, ()) for kind in STEP_KINDS]
        if "strided" in keys:
            profiled += [(kind, f"{kind}, --grouped-bn strided", STRIDED) for kind in STEP_KINDS]
        result.sections.append(profile_markdown(
            [profile_step(label, steps.get(kind, main, False, variant), ceiling_batches(), n_steps, device)
             for kind, label, variant in profiled], device.type))
    return result


def _augmentation_speed(make_batches: Callable[[], Iterator[Batch]], options: BenchOptions,
                        device: torch.device) -> float:
    """Images/s of the fast path's data alone (both MoCo views and the anchor), no model."""
    _, speed = time_steps(lambda batch: None, make_batches, options.warmup, options.steps,
                          options.batch_size, device)
    return speed


def default_out(options: BenchOptions, device_type: str) -> Path:
    stem = ("" if options.stem == "auto" else f"-{options.stem}") + ("" if options.width == 64 else f"-w{options.width}")
    return Path("benchmarks") / f"bench-{device_type}-{options.arch}{stem}-{options.image_size}px.md"


def write_table(result: BenchResult, out: Path) -> Path:
    """Atomically: the table is rewritten after every cell, and a timeout may strike mid-write."""
    out.parent.mkdir(parents=True, exist_ok=True)
    runs._atomic_write_text(out, result.to_markdown())
    return out
