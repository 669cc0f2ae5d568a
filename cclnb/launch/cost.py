"""What a study costs on a cluster, in GPU-hours by phase, before anything is submitted.

Why: a cluster study is paid in *allocated* GPU-hours, and where each phase runs decides how many
GPUs wait while one works. The per-task evaluation and the final linear evaluations used to run
in one process on one GPU of each 8-GPU training job while the other seven waited: by this model
the paper's ImageNet-Sub study then held five to six times the GPU-hours its training needs. The
model is printed by `cclnb study --launcher slurm --dry-run` and writes the table in
docs/performance.md (`python -m cclnb.launch.cost --write docs/performance.md`; a test checks
that the committed table is this model's output), so the estimate and the code cannot drift apart.

The model, per (method, seed) of the plan:

* images, counted from the plan itself: *training* = epochs x (the task's images + the ids
  replayed into it), summed over the method's training tasks (the trainer's own task split
  `plan_tasks`, on labels of the preset's documented class sizes, `DATA`); *per-task evaluation*
  = (kNN bank + val images) per evaluation, one per training task and encoder (the student, and
  the teacher where the method keeps one and `eval_teacher` is on; the untrained baselines: one,
  plus untrained-bn's BatchNorm calibration pass); *linear evaluation* = epochs x train images
  + val images per encoder (lincls), or train + val once (probe); of that, the *pass* (epochs x
  train images, the same augmented batches for every encoder of a seed, since they depend on the
  seed and epoch alone) can be shared by every lincls encoder of a seed;
* busy GPU-hours = images / throughput (images per second per GPU) / 3600, at both ends of each
  throughput range (`Throughputs`: anchors.md's measurements, or `--throughput` measured by you);
* allocated GPU-hours by layout (`LAYOUTS`): **with-training** (one job per (method, seed), as
  before): the job's G GPUs are held through both evaluations, which run in one process, so
  G x (training / G + per-task + linear); **separate**: the per-task evaluation runs on every
  rank of the training job (features extracted in shards, `cclnb.evaluate.per_task`), and the
  linear evaluations in a 1-GPU job that starts when the training job succeeded, so training +
  per-task + linear. Scaling over the G ranks is taken as ideal (a rank's share of the features
  is 1/G of the work; the gather and the kNN itself are well under 1% of it at 224 px);
  **shared** (the default on more than one GPU): as separate, but one 1-GPU evaluation job per
  seed, after every training job of that seed, trains all its encoders' classifiers in one pass
  (`cclnb lincls --also`): each batch is decoded and augmented once and goes through every frozen
  encoder. The loader workers prepare the next batch while the GPU runs the forwards, so the pass
  takes the longer of the two: max(pass / lincls rate, encoders x pass / forward rate), plus each
  encoder's val images at the lincls rate. Never more than separate, where every encoder pays the
  data alone (max(a, n b) <= n max(a, b)); equal for one encoder or the probe protocol.

What it leaves out: queue waits (not GPU-hours), job start-up (minutes against hours) and the
requeues after a time limit (each resumes where the last stopped, so no work is redone beyond the
interrupted epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cclnb.errors import ConfigError

LAYOUTS = ("with-training", "separate", "shared")
PHASES = ("training", "per-task evaluation", "linear evaluation")
MARKERS = ("<!-- cost-table:begin (python -m cclnb.launch.cost --write docs/performance.md) -->",
           "<!-- cost-table:end -->")
DOCS_PAGE = "docs/performance.md"
DOCS_DATA = "/datasets/imagenet"     # the table's -p data: only its sizes (`DATA`) count


@dataclass(frozen=True)
class Range:
    """A value known to lie between `low` and `high` (equal when measured once)."""

    low: float
    high: float

    def __add__(self, other: "Range") -> "Range":
        return Range(self.low + other.low, self.high + other.high)

    def scaled(self, factor: float) -> "Range":
        return Range(self.low * factor, self.high * factor)

    def text(self, digits: int = 1) -> str:
        low, high = f"{self.low:.{digits}f}", f"{self.high:.{digits}f}"
        return low if low == high else f"{low}-{high}"


@dataclass(frozen=True)
class Throughputs:
    """Images per second per GPU of each kind of work, and where the numbers come from."""

    train: Range           # a MoCo step (Finetuning, SimpleReplay, Joint): query fwd+bwd, key fwd
    train_teacher: Range   # a step of a method that keeps a teacher (CCL: + anchor, 2 teacher fwd)
    features: Range        # frozen-backbone features without augmentation (per-task kNN / probe)
    lincls: Range          # the linear protocol: an augmented frozen forward + the fc's step
    forward: Range         # a frozen forward alone, the batch on the GPU (one encoder's share of a shared pass)
    source: str


@dataclass(frozen=True)
class DataSize:
    """A preset's dataset as the model counts it: classes and images per class of each split."""

    n_classes: int
    train_per_class: int
    val_per_class: int
    note: str = ""


# The datasets of the presets (per class: train, val). ImageNet's first 100 classes hold at most
# 1,300 train images each (the README's 13,000 per task); the model takes that bound.
_TIN100 = DataSize(100, 500, 50, "Tiny-ImageNet sub100")
DATA: dict[str, DataSize] = {
    "demo": DataSize(10, 200, 60, "the embedded shapes"),
    "tin100-32": _TIN100, "tin100-32-cpu": _TIN100, "tin100-32-cpu-w16": _TIN100,
    "tin100b-32-cpu-w16": DataSize(100, 500, 50, "Tiny-ImageNet classes 101-200"),
    "tin200-32": DataSize(200, 500, 50, "Tiny-ImageNet"),
    "cifar100": DataSize(100, 500, 100, "CIFAR-100"),
    "imagenet-sub": DataSize(100, 1300, 50, "ImageNet classes 0..99, at most 1,300 train images per class"),
}

# Measured on one H200 (../shared/anchors.md, ResNet-50, 224 px, batch 256, fp32): the MoCo step
# between the authors' whole pipeline (1,008 img/s, data-bound) and cclnb's compute ceiling
# (2,270); the CCL step's ceiling 1,007 (the pipeline's 1,008 is no tighter). The evaluations'
# rates are assumed, not measured: decoding and cropping 224 px JPEGs bounds them (1,000-2,000).
# The frozen forward is derived, not measured: a MoCo step is about 4 forwards' FLOPs (query
# forward + backward ~3, key forward 1; docs/performance.md counts them), so 3-4x the fp32 step
# (the preset's lincls precision): 6,810-9,080 (benchmarks/lincls_pass.py measures it).
ANCHORS: dict[str, Throughputs] = {
    "imagenet-sub": Throughputs(
        train=Range(1008, 2270), train_teacher=Range(1007, 1007), features=Range(1000, 2000),
        lincls=Range(1000, 2000), forward=Range(6810, 9080),
        source="one H200 (../shared/anchors.md: MoCo step 1,008-2,270 img/s, CCL step 1,007; "
               "evaluation 1,000-2,000 img/s assumed, data-bound; frozen forward 6,810-9,080 "
               "derived as 3-4x the fp32 step)"),
}
_KINDS = tuple(f.name for f in dataclasses.fields(Throughputs) if f.name != "source")


def parse_throughputs(entries: Sequence[str], preset: str) -> Throughputs | None:
    """`--throughput KIND=IMG_S` or `KIND=LOW-HIGH` entries over the preset's anchors; None when
    the preset has no anchors and the entries do not name every kind."""
    given: dict[str, Range] = {}
    for entry in entries:
        kind, _, value = entry.partition("=")
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:-\s*(\d+(?:\.\d+)?)\s*)?", value)
        if kind.strip() not in _KINDS or match is None:
            raise ConfigError(f"--throughput {entry!r}: write KIND=IMAGES_PER_S or KIND=LOW-HIGH per GPU, "
                              f"KIND one of {', '.join(_KINDS)} (e.g. --throughput train=1500)")
        low = float(match.group(1))
        high = float(match.group(2) or low)
        if not 0 < low <= high:
            raise ConfigError(f"--throughput {entry!r}: images per second must be > 0, the low end first")
        given[kind.strip()] = Range(low, high)
    base = ANCHORS.get(preset)
    if base is None and set(given) != set(_KINDS):
        return None
    if not given:
        return base
    measured = "; measured by you: " + ", ".join(f"{k} {v.text(0)}" for k, v in given.items())
    values = {k: given.get(k, getattr(base, k, None)) for k in _KINDS}
    return Throughputs(**values, source=(base.source if base else "your --throughput") + measured)


def missing_throughputs(preset: str) -> str:
    return (f"no throughputs are known for preset {preset!r} (../shared/anchors.md measures the "
            f"imagenet-sub setting); pass --throughput KIND=IMG_S for each of {', '.join(_KINDS)} "
            f"(per GPU, measured with `cclnb bench` and a timed evaluation) for a cost estimate")


# ----------------------------------------------------------------------------- images per phase
@dataclass(frozen=True)
class PairWork:
    """The images one (method, seed) processes in each phase, and the GPUs of its training job."""

    label: str
    training: int
    teacher_step: bool      # its training steps are a teacher method's (train_teacher rate)
    step_cost: float        # a non-teacher method's step time relative to a MoCo step
    per_task: int
    linear: int
    gpus: int               # GPUs of the job that trains it (1 for the untrained baselines)
    seed: int = 0
    pass_images: int = 0    # of `linear`: one lincls encoder's augmented pass (epochs x train images)
    pass_encoders: int = 0  # its encoders evaluated by the lincls protocol (those a shared pass serves)


def _labels(size: DataSize, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(size.n_classes), per_class)


def pair_work(steps: Sequence[Any], size: DataSize, gpus: int, linear_defaults: Mapping[str, Any]) -> PairWork:
    """Count the images of one (method, seed): its plan steps (`cclnb.launch.cluster.Pair.steps`)."""
    from cclnb.study import train_config
    from cclnb.study.baseline import CALIBRATION_PER_CLASS
    from cclnb.study.report import UNTRAINED_BN
    from cclnb.training import plan_tasks
    from cclnb.training.methods import registry

    first = steps[0]
    method = str(first.parameters["method"])
    trains = first.notebook == "task_sequence"
    config = train_config({**first.parameters, "method": method if trains else "Finetuning"})
    plan = plan_tasks(config, _labels(size, size.train_per_class), size.n_classes)
    per_class = len(plan.all_ids) // len(plan.classes)
    bank = len(plan.classes) * min(per_class, config.eval_bank_per_class or per_class)
    val = len(plan.classes) * size.val_per_class
    evaluation = bank + val if config.eval_each_task != "none" else 0
    training, teacher_step, step_cost = 0, False, 1.0
    if trains:
        cls = registry.method_class(method)
        # the method's own rule for what it trains on (Joint: one task of every class); no
        # instance state is read, so an unbuilt instance serves
        tasks = cls.training_tasks(cls.__new__(cls), plan.task_ids)
        budget = config.n_save * plan.classes_per_task if cls.uses_replay else 0
        training = sum(config.epochs * (len(ids) + budget * t) for t, ids in enumerate(tasks))
        encoders = 1 + int(cls.keeps_teacher and config.eval_teacher)
        per_task = evaluation * len(tasks) * encoders
        teacher_step, step_cost = cls.keeps_teacher, cls.step_cost
    else:
        calibration = len(plan.classes) * min(per_class, CALIBRATION_PER_CLASS) if method == UNTRAINED_BN else 0
        per_task = evaluation + calibration
    linear = pass_images = pass_encoders = 0
    for step in steps:
        if step.notebook != "linear_eval":
            continue
        params = {**linear_defaults, **step.parameters}
        lin_per_class = min(size.train_per_class, params.get("subset_per_class") or size.train_per_class)
        lin_train, lin_val = size.n_classes * lin_per_class, size.n_classes * size.val_per_class
        lincls = params.get("protocol", "lincls") == "lincls"
        epochs = int(params["epochs"]) if lincls else 1
        linear += epochs * lin_train + lin_val
        if lincls:
            pass_images, pass_encoders = epochs * lin_train, pass_encoders + 1
    seed = int(first.parameters["seed"])
    return PairWork(f"{method} seed {seed}", training, teacher_step, step_cost, per_task, linear,
                    gpus if trains else 1, seed, pass_images, pass_encoders)


# ----------------------------------------------------------------------------- hours
@dataclass(frozen=True)
class PairCost:
    """Busy and allocated GPU-hours of one (method, seed), each a range (fast end, slow end)."""

    label: str
    gpus: int
    training: Range
    per_task: Range
    linear: Range            # each encoder's evaluation on its own (separate, with-training)
    shared_linear: Range     # its share of its seed's one-pass evaluation (shared)
    allocated: dict[str, Range]

    @property
    def busy(self) -> Range:
        """GPU-hours at work with a pass per encoder (with-training, separate)."""
        return self.training + self.per_task + self.linear

    @property
    def busy_shared(self) -> Range:
        """GPU-hours at work with one pass per seed (shared): all it allocates."""
        return self.training + self.per_task + self.shared_linear


def _hours(images: int, rate: Range) -> Range:
    """Hours for `images` at `rate` images/s: the fast end at the high rate."""
    return Range(images / rate.high / 3600, images / rate.low / 3600)


def allocated(layout: str, gpus: int, training: Range, per_task: Range, linear: Range,
              shared_linear: Range | None = None) -> Range:
    """Allocated GPU-hours of one (method, seed) in `layout` (see the module docstring);
    `shared_linear`: its share of its seed's one-pass evaluation (default: `linear`, a pass alone)."""
    if layout == "with-training":
        return training + (per_task + linear).scaled(gpus)
    if layout == "separate":
        return training + per_task + linear
    if layout == "shared":
        return training + per_task + (linear if shared_linear is None else shared_linear)
    raise ConfigError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def choose_layout(gpus: int) -> str:
    """The layout with the fewest allocated GPU-hours by `allocated`: off the training allocation
    saves (G - 1) x the evaluations' hours on a job of G > 1 GPUs, and one pass per seed costs
    never more than a pass per encoder (module docstring), so shared wins or ties at any
    throughputs (a tie, the probe protocol: still one job per seed, not one per pair). On one GPU
    all tie: then one job per pair (no second queue wait)."""
    return "shared" if gpus > 1 else "with-training"


def shared_pass_hours(works: Sequence[PairWork], rates: Throughputs) -> list[Range]:
    """Each pair's share of its seed's one-pass evaluation (`shared` layout): the pass takes
    max(data, forwards) at each end of the ranges, shared by the lincls encoders in proportion;
    what the pass does not cover (val images, probe encoders) stays each pair's own."""
    shares = []
    for work in works:
        own = _hours(work.linear - work.pass_images * work.pass_encoders, rates.lincls)
        seed = [w for w in works if w.seed == work.seed and w.pass_encoders]
        if not work.pass_encoders:
            shares.append(own)
            continue
        images = max(w.pass_images for w in seed)
        encoders = sum(w.pass_images * w.pass_encoders for w in seed)   # encoder-images through the GPU
        data, forwards = _hours(images, rates.lincls), _hours(encoders, rates.forward)
        whole = Range(max(data.low, forwards.low), max(data.high, forwards.high))
        shares.append(own + whole.scaled(work.pass_images * work.pass_encoders / encoders))
    return shares


def pair_cost(work: PairWork, rates: Throughputs, shared_linear: Range | None = None) -> PairCost:
    """The cost of one (method, seed); `shared_linear`: its share of its seed's one-pass
    evaluation (`shared_pass_hours`; default: a pass of its own)."""
    train_rate = rates.train_teacher if work.teacher_step else rates.train.scaled(1 / work.step_cost)
    training = _hours(work.training, train_rate)
    per_task = _hours(work.per_task, rates.features)
    linear = _hours(work.linear, rates.lincls)
    shared = shared_pass_hours([work], rates)[0] if shared_linear is None else shared_linear
    return PairCost(work.label, work.gpus, training, per_task, linear, shared,
                    {layout: allocated(layout, work.gpus, training, per_task, linear, shared) for layout in LAYOUTS})


def work_costs(works: Sequence[PairWork], rates: Throughputs) -> list[PairCost]:
    """The cost of every pair, the pairs of a seed sharing their evaluation pass."""
    return [pair_cost(work, rates, share) for work, share in zip(works, shared_pass_hours(works, rates))]


def _total(costs: Iterable[PairCost]) -> PairCost:
    costs = list(costs)
    zero = Range(0, 0)

    def add(ranges: Iterable[Range]) -> Range:
        total = zero
        for r in ranges:
            total = total + r
        return total

    return PairCost("total", 0, add(c.training for c in costs), add(c.per_task for c in costs),
                    add(c.linear for c in costs), add(c.shared_linear for c in costs),
                    {layout: add(c.allocated[layout] for c in costs) for layout in LAYOUTS})


def ratio(allocated_hours: Range, training: Range) -> Range:
    """Allocated / training GPU-hours, each end against the same end."""
    return Range(allocated_hours.low / training.low, allocated_hours.high / training.high)


# ----------------------------------------------------------------------------- the table
def table(costs: Sequence[PairCost], gpus: int, seeds: int) -> str:
    """The markdown table of `costs` (one row per (method, seed), then the total) and its summary
    line: allocated against training GPU-hours per seed, both layouts."""
    total = _total(costs)
    head = (f"| (method, seed) | training | per-task evaluation | linear evaluation: alone | in one pass per seed "
            f"| busy: alone | one pass | allocated: one {gpus}-GPU job each | training job + 1-GPU evaluation job "
            f"each | training jobs + one 1-GPU evaluation job per seed (default) |")
    rows = [head, "|" + "---|" * 10]
    for c in [*costs, total]:
        name = "**total**" if c is total else c.label
        cells = [c.training, c.per_task, c.linear, c.shared_linear, c.busy, c.busy_shared,
                 *(c.allocated[layout] for layout in LAYOUTS)]
        rows.append(f"| {name} | " + " | ".join(cell.text() for cell in cells) + " |")
    per_seed = {layout: total.allocated[layout].scaled(1 / seeds) for layout in LAYOUTS}
    train_seed = total.training.scaled(1 / seeds)

    def versus(layout: str) -> str:
        return f"{per_seed[layout].text(0)} ({ratio(per_seed[layout], train_seed).text()}x)"

    summary = (f"Per seed: **{per_seed['shared'].text(0)} allocated GPU-hours**, "
               f"{ratio(per_seed['shared'], train_seed).text()}x the {train_seed.text(0)} of training, with "
               f"each seed's evaluations in one 1-GPU job and one pass; with an evaluation job per "
               f"(method, seed), {versus('separate')}; with everything in the training job, {versus('with-training')}.")
    return "\n".join(rows) + "\n\n" + summary


def plan_costs(plan: Any, gpus: int, rates: Throughputs) -> list[PairCost]:
    """The cost of every (method, seed) of a study plan (`cclnb.study.plan_study`)."""
    from cclnb.launch.cluster import pairs_of
    from cclnb.study.notebooks import notebook_defaults, notebook_parameters, notebook_path

    size = DATA.get(plan.preset.name)
    if size is None:
        raise ConfigError(f"the cost model does not know the dataset sizes of preset {plan.preset.name!r}; "
                          f"add it to cclnb.launch.cost.DATA")
    defaults = notebook_defaults(notebook_parameters(notebook_path("linear_eval")))
    return work_costs([pair_work(pair.steps, size, gpus, defaults) for pair in pairs_of(plan)], rates)


def describe(plan: Any, gpus: int, rates: Throughputs | None) -> str:
    """The dry run's cost section: the table and the rates it rests on."""
    if gpus == 0:
        return "estimated cost: the jobs hold no GPU (a CPU preset): no GPU-hours to estimate"
    if rates is None:
        return "estimated cost: " + missing_throughputs(plan.preset.name)
    costs = plan_costs(plan, gpus, rates)
    return (f"estimated GPU-hours (model: cclnb.launch.cost; throughputs per GPU: {rates.source}):\n"
            + table(costs, gpus, len(plan.seeds)))


def docs_table() -> str:
    """The table docs/performance.md holds: the paper's study, one seed, the preset's allocation."""
    from cclnb import study
    from cclnb.launch import resources as res

    with tempfile.TemporaryDirectory(prefix="cclnb-cost-") as folder:
        plan = study.plan_study("imagenet-sub", [f"data={DOCS_DATA}"], runs_root=Path(folder) / "runs",
                                reports_root=Path(folder) / "reports")
        gpus = res.PRESETS["imagenet-sub"].world_size
        body = table(plan_costs(plan, gpus, ANCHORS["imagenet-sub"]), gpus, len(plan.seeds))
    return f"Throughputs per GPU: {ANCHORS['imagenet-sub'].source}.\n\n{body}"


def replace_between_markers(text: str, body: str) -> str:
    begin, end = MARKERS
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ConfigError(f"the page must hold the markers {begin} and {end} once each, in that order")
    head, rest = text.split(begin)
    return f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"


def between_markers(text: str) -> str:
    begin, end = MARKERS
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the docs table, or write it between the markers of a page."""
    parser = argparse.ArgumentParser(prog="python -m cclnb.launch.cost", description=main.__doc__)
    parser.add_argument("--write", metavar="PAGE", help=f"replace the table in PAGE (e.g. {DOCS_PAGE})")
    args = parser.parse_args(argv)
    body = docs_table()
    if args.write is None:
        print(body)
        return 0
    from cclnb.training.runs import _atomic_write_text

    page = Path(args.write)
    _atomic_write_text(page, replace_between_markers(page.read_text(encoding="utf-8"), body))
    print(f"wrote the cost table into {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
