"""Study presets and the papermill runner behind `cclnb study`.

A study is, for every seed: the task-sequence notebook once per method (pretraining over the
task sequence), the untrained encoder those runs start from, as built and with BatchNorm statistics
of the data (`cclnb.baseline`), the linear-
evaluation notebook for each encoder (student, and the teacher where the method has one), and a
record of each finished (method, seed) in `reports/<study>/runs/` (`cclnb.records`); then the
report notebook, which reads only records, rendered to a self-contained HTML page. Every step's
executed notebook is kept next to its run, so a result can always be traced to the cells that
produced it; the records are small and committed, so results from several machines and sessions
accumulate into one report.

Why the checks here exist: papermill only *warns* about a misspelled parameter and then runs
with the default, which silently produces the wrong experiment; so every `-p name=value` is
checked against the notebooks' `parameters` cells and typed from their defaults. A finished
step is skipped on the next call, and a failed step names the notebook and the cell, leaving
everything already done in place.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from cclnb.config import ABLATIONS, METHODS, TrainConfig, canonical_method
from cclnb.errors import CclnbError, ConfigError, DataError
from cclnb.records import RECORDS_FOLDER, record_name
from cclnb.report import BASELINES, UNTRAINED_BN

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("task_sequence", "linear_eval", "report")
TEACHER_METHODS = ("CCL", *ABLATIONS)  # methods whose run keeps a momentum teacher worth probing
# Parameters the runner sets for every step; -p cannot override them (use the CLI options).
RUNNER_PARAMETERS = {"task_sequence": {"method", "run_dir", "resume", "seed"},
                     "linear_eval": {"run_dir", "who", "seed"},
                     "report": {"records", "out_dir", "study"}}
RUNNER_OPTIONS = {"seed": "--seeds", "records": "--records"}  # the option to use instead of -p
# Arguments of every notebook's kernel. ipykernel warns at every start that its local TCP sockets
# are unencrypted, which tells a study's user nothing; its errors still show.
KERNEL_ARGUMENTS = ("--IPKernelApp.log_level=ERROR",)


class StudyStepFailed(CclnbError):
    """Steps of the study raised; each `StepFailure` names the file that holds its traceback."""

    exit_code = 6

    def __init__(self, failures: Sequence[StepFailure], message: str) -> None:
        super().__init__(message)
        self.failures = list(failures)


def shared_data(filename: str) -> str | None:
    """`../shared/data/<filename>` relative to the repository when it exists, else None."""
    path = REPO_ROOT.parent / "shared" / "data" / filename
    return str(path) if path.exists() else None


@dataclass(frozen=True)
class Preset:
    """A named study: which methods, and the notebook parameters every method shares.

    `task_sequence` / `linear_eval` / `report` hold parameter values for those notebooks (names
    must exist in the notebook's `parameters` cell; `test_study` checks). `data_hint` is what the
    error says when the preset's data is not on this machine. `jobs`: how many (method, seed)
    runs proceed at once, each notebook in its own process (one GPU holds several small runs; on
    a small CPU two processes hide each other's kernel start-up). `seeds`: every method runs once
    per seed (`--seeds` overrides). `threads`: CPU threads of every step, pinned (OMP_NUM_THREADS of
    each notebook's process, and torch's for the in-process steps) whatever the machine's core
    count or the caller's environment; None divides the cores among the jobs. A CPU study whose
    numbers must repeat pins it: a bf16 convolution's gradient differs in its last bits between 1
    and 2 threads, and a few hundred steps turn that into different accuracies.
    """

    name: str
    description: str
    task_sequence: Mapping[str, Any]
    linear_eval: Mapping[str, Any]
    report: Mapping[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = METHODS
    data_hint: str = ""
    jobs: int = 1
    seeds: tuple[int, ...] = (0,)
    threads: int | None = None

    def parameters(self, notebook: str) -> dict[str, Any]:
        return dict(getattr(self, notebook))


# MoCo v2 with the authors' flags (mlp, aug_plus, cos, T=0.2) unless a preset says otherwise.
_MOCO_V2 = {"mlp": True, "aug_plus": True, "cos": True, "moco_t": 0.2, "lr": 0.03, "n_save": 20}
# The 32 px GPU studies: 10 tasks, ResNet-18 with the CIFAR stem, a queue sized for 5,000-image
# tasks (65,536 keys would hold every image of a task many times), bf16, per-task kNN.
_GPU_32PX = {**_MOCO_V2, "n_tasks": 10, "epochs": 50, "arch": "resnet18", "stem": "cifar",
             "image_size": 32, "batch_size": 256, "moco_k": 4096, "precision": "bf16",
             "device": "cuda", "eval_each_task": "knn", "eval_teacher": True}
_GPU_LINCLS = {"protocol": "lincls", "epochs": 100, "device": "cuda", "precision": "bf16"}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="demo",
        description="embedded shapes (10 classes, 32 px), 5 tasks of 2 classes, CPU, ResNet-18 at "
                    "an eighth of its width with the 3x3 stem, bf16, fast feature probe, 3 seeds: "
                    "minutes on 2 cores",
        # Chosen by measurement on this project's 2-core CPU (docs/study.md, "The demo preset"):
        # the shapes, on which random features score about 34% kNN and MoCo learns form within a
        # few hundred steps; the 3x3 stem keeps all 32 px and an eighth of the channels keeps a
        # step cheap; batch 32 = one of the authors' GPUs (query BatchNorm over the 32, keys
        # shuffled over 2 groups of 16), key momentum 0.99 so the key encoder follows within a
        # task of ~40 steps, lr 0.1, a queue of 256, 3 epochs per task. Both precisions and one
        # thread per job are pinned: the numbers then repeat to the last digit on one machine.
        task_sequence={**_MOCO_V2, "dataset": "demo", "data": "demo", "n_tasks": 5, "epochs": 4,
                       "arch": "resnet18", "stem": "cifar", "width": 8, "image_size": 16,
                       "batch_size": 32, "lr": 0.1, "bn_groups": 1, "key_bn_groups": 2, "moco_m": 0.99,
                       "moco_k": 64, "ccl_k": 32, "device": "cpu", "precision": "bf16",
                       "eval_each_task": "knn", "eval_teacher": True, "eval_bank_per_class": 50,
                       "knn_k": 20},
        linear_eval={"protocol": "probe", "epochs": 50, "device": "cpu", "precision": "bf16", "workers": 0},
        report={"title": "cclnb demo study: continual MoCo v2 on embedded shapes"},
        seeds=(0, 1, 2), jobs=2, threads=1),
    Preset(
        name="tin100-32",
        description="Tiny-ImageNet-32 sub100 (100 classes), 10 tasks, ResNet-18 at 32 px, "
                    "MoCo queue 4096, bf16 on one GPU (set -p epochs=N)",
        task_sequence={**_GPU_32PX, "dataset": "zip",
                       "data": shared_data("tiny-imagenet-32-sub100.zip")},
        linear_eval=_GPU_LINCLS,
        report={"title": "Continual MoCo v2 on Tiny-ImageNet-32 (100 classes, 10 tasks)"},
        data_hint="tiny-imagenet-32-sub100.zip (ImageNet folder layout inside the zip)",
        jobs=4),
    Preset(
        name="tin100-32-cpu",
        description="Tiny-ImageNet-32 sub100 (100 classes, 250 train images per class), 10 tasks, "
                    "ResNet-18 with the ImageNet stem at 32 px, bf16 (pinned: its records are bf16), 8 epochs per task, "
                    "2 seeds: about 33 minutes per seed on 2 AMD EPYC cores (2 Intel Xeon cores: about 3x longer)",
        # Sized for this project's 2-core CPU (docs/study.md, "The CPU preset"): the ImageNet stem
        # (7x the 3x3 stem's speed at 32 px), key momentum 0.99 (0.999 leaves the MoCo loss at
        # ln(K+1) over a few hundred steps per task), batch 64 in 2 BatchNorm groups of 32 (the
        # authors' per-GPU size), a queue of 1024, 8 epochs per task (4 left Finetuning at 1.36x
        # the untrained-bn kNN, 8 reach 1.58x), per-task kNN on 50 train images per class (k 20),
        # the fast probe at the end.
        task_sequence={**_MOCO_V2, "dataset": "zip", "data": shared_data("tiny-imagenet-32-sub100.zip"),
                       "subset_per_class": 250, "n_tasks": 10, "epochs": 8, "arch": "resnet18",
                       "stem": "imagenet", "image_size": 32, "batch_size": 64, "lr": 0.015,
                       "moco_m": 0.99, "moco_k": 1024, "ccl_k": 256, "bn_groups": 2, "key_bn_groups": 2,
                       "device": "cpu", "precision": "bf16", "eval_each_task": "knn", "eval_teacher": True,
                       "eval_bank_per_class": 50, "knn_k": 20},
        linear_eval={"protocol": "probe", "epochs": 100, "device": "cpu", "workers": 0},
        report={"title": "Continual MoCo v2 on Tiny-ImageNet-32 sub100, CPU budget (10 tasks)"},
        data_hint="tiny-imagenet-32-sub100.zip (ImageNet folder layout inside the zip)",
        seeds=(0, 1), jobs=2),
    Preset(
        name="tin100-32-cpu-w16",
        description="Tiny-ImageNet-32 sub100 (100 classes, 250 train images per class), 10 tasks, "
                    "a quarter-width ResNet-18 (16-32-64-128 channels) with the 3x3 stem at full "
                    "resolution, bf16, 8 epochs per task, 5 seeds; CCL's ablations available as methods",
        # Chosen from benchmarks/cpu-candidates.md (issue 19): on the first 3 tasks at the same images
        # seen, the quarter-width network that keeps every pixel ends far above the ImageNet stem's
        # 8 px view (Finetuning kNN 14.1 against 11.8, probe 11.4 against 8.4, seed 0) and its
        # training step is faster on these cores. Everything else as tin100-32-cpu (batch 64 in two
        # BatchNorm groups, key momentum 0.99, queue 1024, lr 0.015, 250 images per class, 8 epochs
        # per task); precision pinned to bf16 so that seeds added on another machine are averaged.
        task_sequence={**_MOCO_V2, "dataset": "zip", "data": shared_data("tiny-imagenet-32-sub100.zip"),
                       "subset_per_class": 250, "n_tasks": 10, "epochs": 8, "arch": "resnet18",
                       "stem": "cifar", "width": 16, "image_size": 32, "batch_size": 64, "lr": 0.015,
                       "moco_m": 0.99, "moco_k": 1024, "ccl_k": 256, "bn_groups": 2, "key_bn_groups": 2,
                       "device": "cpu", "precision": "bf16", "eval_each_task": "knn", "eval_teacher": True,
                       "eval_bank_per_class": 50, "knn_k": 20},
        linear_eval={"protocol": "probe", "epochs": 100, "device": "cpu", "workers": 0},
        report={"title": "Continual MoCo v2 on Tiny-ImageNet-32 sub100, CPU budget, quarter-width "
                         "ResNet-18 at full resolution (10 tasks)"},
        data_hint="tiny-imagenet-32-sub100.zip (ImageNet folder layout inside the zip)",
        seeds=(0, 1, 2, 3, 4), jobs=2),
    Preset(
        name="tin200-32",
        description="Tiny-ImageNet-32, all 200 classes, 10 tasks of 20, ResNet-18 at 32 px, bf16",
        task_sequence={**_GPU_32PX, "dataset": "zip", "data": shared_data("tiny-imagenet-32.zip")},
        linear_eval=_GPU_LINCLS,
        report={"title": "Continual MoCo v2 on Tiny-ImageNet-32 (200 classes, 10 tasks)"},
        data_hint="tiny-imagenet-32.zip (ImageNet folder layout inside the zip)",
        jobs=4),
    Preset(
        name="imagenet-sub",
        description="the authors' protocol exactly: ImageNet-Sub (classes 0..99), ResNet-50 at "
                    "224 px, 10 tasks, 200 epochs per task, queue 65536, T 0.2, mlp, aug+, cos, "
                    "lr 0.03, batch 256, fp32; lincls 100 epochs",
        task_sequence={**_MOCO_V2, "dataset": "imagefolder", "data": None, "imagenetsub": True,
                       "n_tasks": 10, "epochs": 200, "arch": "resnet50", "stem": "imagenet",
                       "image_size": 224, "batch_size": 256, "moco_k": 65536, "precision": "fp32",
                       "device": "cuda", "eval_each_task": "knn",
                       "eval_teacher": True},
        linear_eval={"protocol": "lincls", "epochs": 100, "device": "cuda", "precision": "fp32"},
        report={"title": "CCL reproduction: ImageNet-Sub, ResNet-50, 10 tasks"},
        data_hint="an ImageNet root holding train/ and val/ class folders"),
    Preset(
        name="cifar100",
        description="CIFAR-100, 10 tasks of 10 classes, ResNet-18 at 32 px, bf16",
        task_sequence={**_GPU_32PX, "dataset": "cifar100", "data": shared_data("cifar-100-python")},
        linear_eval=_GPU_LINCLS,
        report={"title": "Continual MoCo v2 on CIFAR-100 (10 tasks)"},
        data_hint="the cifar-100-python folder (or add -p download=True)",
        jobs=4),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------- parameters
def notebook_path(notebook: str, notebooks_dir: str | Path | None = None) -> Path:
    path = Path(notebooks_dir or REPO_ROOT / "notebooks") / f"{notebook}.ipynb"
    if not path.is_file():
        raise ConfigError(f"notebook {path} not found; run from a cclnb checkout (the notebooks "
                          f"ship in its notebooks/ folder) or pass notebooks_dir")
    return path


def notebook_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """The `parameters` cell of a notebook as papermill reads it: name -> {default, type, help}."""
    import papermill

    params = papermill.inspect_notebook(str(path))
    if not params:
        raise ConfigError(f"{path} has no cell tagged `parameters`; tag the cell that holds the "
                          f"defaults so papermill can inject values")
    return params


_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict,
                           "list": list}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _declared_type(spec: Mapping[str, Any]) -> tuple[type | None, bool]:
    """(type, may be None) of a parameter, from its annotation or else its default's type."""
    annotation = spec.get("inferred_type_name") or "None"
    optional = re.fullmatch(r"Optional\[(\w+)\]", annotation)
    if optional:
        return _TYPES.get(optional.group(1)), True
    if annotation in _TYPES:
        return _TYPES[annotation], False
    default = _literal(spec.get("default", "None"))
    return (None, True) if default is None else (type(default), False)


def parse_value(name: str, raw: str, spec: Mapping[str, Any]) -> Any:
    """Convert the text of `-p name=raw` to the type of the parameter's default."""
    kind, optional = _declared_type(spec)
    text = raw.strip()
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return raw
        if kind in (list, dict):
            value = json.loads(text) if text[:1] in "[{" else ast.literal_eval(text)
            if not isinstance(value, kind):
                raise ValueError
            return value
    except (ValueError, SyntaxError, json.JSONDecodeError):
        expected = f"{kind.__name__}{' or None' if optional else ''}"
        raise ConfigError(f"-p {name}={raw!r}: expected {expected} (default {spec.get('default')})")
    return _literal(text)  # untyped default None: a Python literal, else the text itself


def split_overrides(pairs: Sequence[str], specs: Mapping[str, Mapping[str, Mapping[str, Any]]]
                    ) -> dict[str, dict[str, Any]]:
    """Route `name=value` pairs to the notebooks that declare `name`, typed from the defaults.

    An unprefixed name goes to the first notebook (task_sequence, linear_eval, report) that has
    it, so `-p epochs=5` means pretraining epochs; `linear_eval.epochs=30` targets one notebook.
    Unknown names are a ConfigError listing every valid name: papermill would only warn.
    """
    routed: dict[str, dict[str, Any]] = {nb: {} for nb in specs}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"-p {pair!r}: write parameters as name=value, e.g. -p epochs=5")
        notebook, dot, name = key.rpartition(".")
        if dot and notebook not in specs:
            raise ConfigError(f"-p {key}: unknown notebook prefix {notebook!r}; use one of "
                              f"{', '.join(specs)} (e.g. -p linear_eval.epochs=30)")
        candidates = [notebook] if dot else [nb for nb in specs if name in specs[nb]]
        target = next((nb for nb in candidates if name in specs[nb]), None)
        if target is None:
            valid = "; ".join(f"{nb}: {', '.join(sorted(set(specs[nb]) - RUNNER_PARAMETERS[nb]))}"
                              for nb in specs)
            raise ConfigError(f"unknown parameter {key!r}; valid names are -> {valid}")
        if name in RUNNER_PARAMETERS[target]:
            option = RUNNER_OPTIONS.get(name, "--methods, --runs-root, --reports-root or --study")
            raise ConfigError(f"-p {key}: `{name}` is set by the study runner for each step; use "
                              f"{option} instead")
        routed[target][name] = parse_value(key, raw, specs[target][name])
    return routed


# ----------------------------------------------------------------------------- the plan
@dataclass
class Step:
    """One step of the study: a notebook execution, or an in-process `action` (the untrained
    encoder, writing a record) whose `notebook` names its kind."""

    label: str                       # "CCL seed 0: task sequence"
    notebook: str                    # task_sequence | linear_eval | report | untrained | record
    output: Path                     # the executed copy, or the file the action writes
    parameters: dict[str, Any]
    done: bool = False               # finished by an earlier call: skipped
    action: Callable[[], object] | None = None
    group: str = ""                  # steps of one group run in order ("CCL seed 0")
    log: Path | None = None          # an action's log: where a failure leaves its traceback


@dataclass
class Study:
    name: str
    preset: Preset
    runs_dir: Path
    report_dir: Path
    steps: list[Step]
    jobs: int
    seeds: tuple[int, ...] = (0,)
    forced: tuple[Path, ...] = ()    # run directories --force deletes once the pre-flight has passed

    @property
    def threads(self) -> int:
        """CPU threads per step: the preset's pinned count, else the cores shared among the jobs."""
        return self.preset.threads or max(1, (os.cpu_count() or 1) // self.jobs)

    @property
    def html(self) -> Path:
        return self.report_dir / "index.html"

    @property
    def records_dir(self) -> Path:
        return self.report_dir / RECORDS_FOLDER


def _training_done(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    if not status.is_file():
        return False
    try:
        return json.loads(status.read_text(encoding="utf-8")).get("state") == "complete"
    except json.JSONDecodeError:
        return False


def train_config(parameters: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig the task-sequence notebook builds from these parameters (its names are
    TrainConfig fields; `extra` holds any other field; `torchrun_args` says how to launch it)."""
    values = {k: v for k, v in parameters.items() if k not in ("extra", "torchrun_args")}
    return TrainConfig.from_dict({**values, **(parameters.get("extra") or {})})


def untrained_config(parameters: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of an untrained-baseline step: the task-sequence one under any valid method
    (the baseline never trains and records itself as untrained)."""
    return train_config({**parameters, "method": METHODS[0]})


def _untrained(parameters: Mapping[str, Any], calibrate_bn: bool) -> Path:
    from cclnb.baseline import untrained_run

    # it runs in the study's own process: its progress bars would interleave with the step lines
    return untrained_run(untrained_config({**parameters, "progress": False}), calibrate_bn)


def _record(run_dir: Path, folder: Path, study: str) -> Path:
    from cclnb.records import write_record

    return write_record(run_dir, folder, study)


def _seeds(seeds: Sequence[int] | None, preset: Preset) -> tuple[int, ...]:
    chosen = tuple(dict.fromkeys(int(s) for s in (preset.seeds if seeds is None else seeds)))
    if not chosen or any(s < 0 for s in chosen):
        raise ConfigError(f"--seeds needs one or more non-negative integers, got {list(seeds or [])}")
    return chosen


def plan_study(preset: str | Preset, overrides: Sequence[str] = (), *, runs_root: str | Path = "runs",
               reports_root: str | Path = "reports", methods: Sequence[str] | None = None,
               study: str | None = None, force: bool = False, jobs: int | None = None,
               seeds: Sequence[int] | None = None, baseline: bool = True,
               records: Sequence[str | Path] = (), report_only: bool = False,
               notebooks_dir: str | Path | None = None) -> Study:
    """Resolve the preset and `-p` overrides into the ordered steps (nothing runs yet).

    Seed by seed (so an interrupted study leaves whole seeds): every method's task sequence in
    `runs/<study>/<method>/seed<k>`, the two untrained baselines (`baseline`), the linear evals, and a
    record per (method, seed) in `reports/<study>/runs/`; then the report, which reads the
    records there and in the extra `records` folders. A (method, seed) whose run directory is
    complete is skipped (its record is rewritten from it); a half-finished run resumes from its
    last checkpoint; with `force` the selected run directories are planned afresh and `run_study`
    deletes them once its pre-flight has passed (planning changes nothing on disk).
    `report_only` plans only the report (records from other machines, nothing to train).
    `jobs` (default: the preset's) is how many (method, seed) runs proceed at once.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    specs = {nb: notebook_parameters(notebook_path(nb, notebooks_dir)) for nb in NOTEBOOKS}
    routed = split_overrides(overrides, specs)
    params = {nb: {**preset.parameters(nb), **routed[nb]} for nb in NOTEBOOKS}
    check_preset(preset, specs)
    data = params["task_sequence"].get("data")
    if data is None:
        raise ConfigError(f"preset {preset.name!r} needs its data: pass -p data=PATH "
                          f"({preset.data_hint or 'the dataset location'})")
    if data != "demo" and Path(data).exists():
        # The notebooks run in other working directories: a path relative to the caller's
        # must reach them absolute.
        params["task_sequence"]["data"] = str(Path(data).resolve())
    chosen = [canonical_method(m) for m in (methods or preset.methods)]
    chosen_seeds = _seeds(seeds, preset)
    name = study or preset.name
    runs_dir = Path(runs_root).resolve() / name
    report_dir = Path(reports_root).resolve() / name
    records_dir = report_dir / RECORDS_FOLDER
    steps: list[Step] = []
    forced: list[Path] = []
    for seed in ([] if report_only else chosen_seeds):
        for method in [*chosen, *(BASELINES if baseline else ())]:
            run_dir = runs_dir / method / f"seed{seed}"
            if force and run_dir.exists():
                forced.append(run_dir)
            steps += _method_steps(method, seed, run_dir, params, records_dir, name, fresh=force)
    folders = [str(records_dir), *(str(Path(f).resolve()) for f in records)]
    steps.append(Step("report", "report", runs_dir / "report.ipynb",
                      {**params["report"], "study": name, "records": folders,
                       "budget": _budget_folders(params["report"].get("budget") or []),
                       "out_dir": str(report_dir)}))
    jobs = preset.jobs if jobs is None else jobs
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (1 runs one notebook at a time), got {jobs}")
    return Study(name, preset, runs_dir, report_dir, steps, jobs, chosen_seeds, tuple(forced))


def _budget_folders(folders: Sequence[str]) -> list[str]:
    """The budget axis' records folders as absolute paths (the report's kernel runs elsewhere), each
    checked to hold records: a typo must not silently drop a point of the axis."""
    resolved = [Path(f).resolve() for f in folders]
    for folder in resolved:
        if not any(folder.glob("*-seed*.json")):
            raise DataError(f"-p report.budget names {folder}, which holds no study records "
                              f"(<method>-seed<k>.json); pass the runs/ folder of another study of this preset")
    return [str(f) for f in resolved]


def _method_steps(method: str, seed: int, run_dir: Path, params: Mapping[str, dict[str, Any]],
                  records_dir: Path, study: str, fresh: bool) -> list[Step]:
    """Pretraining (or the untrained encoder), linear evals and the record of one (method, seed);
    `fresh`: as if `run_dir` were empty (--force deletes it before the first step)."""
    trained = not fresh and _training_done(run_dir)
    who_list = ("student", "teacher") if method in TEACHER_METHODS else ("student",)
    label = f"{method} seed {seed}"
    train_params = {**params["task_sequence"], "method": method, "run_dir": str(run_dir), "seed": seed}
    if method in BASELINES:
        first = Step(f"{label}: evaluate at initialisation", "untrained", run_dir / "config.json",
                     train_params, done=trained,
                     action=functools.partial(_untrained, train_params, method == UNTRAINED_BN),
                     log=run_dir / "untrained.log")
    else:
        resume = str(run_dir) if not fresh and (run_dir / "checkpoints" / "last.pt").is_file() else None
        first = Step(f"{label}: task sequence", "task_sequence", run_dir / "task_sequence.ipynb",
                     {**train_params, "resume": None if trained else resume}, done=trained)
    evals = [Step(f"{label}: linear eval ({who})", "linear_eval", run_dir / f"linear_eval_{who}.ipynb",
                  {**params["linear_eval"], "run_dir": str(run_dir), "who": who, "seed": seed},
                  done=trained and (run_dir / f"lincls_{who}.json").is_file())
             for who in who_list]
    record = Step(f"{label}: record", "record", records_dir / record_name(method, seed), {},
                  action=functools.partial(_record, run_dir, records_dir, study), log=run_dir / "record.log")
    steps = [first, *evals, record]
    for step in steps:
        step.group = label
    return steps


def check_preset(preset: Preset, specs: Mapping[str, Mapping[str, Any]]) -> None:
    """A preset naming a parameter its notebook lacks is a bug in cclnb, not in the user's call."""
    for nb in NOTEBOOKS:
        unknown = sorted(set(preset.parameters(nb)) - set(specs[nb]))
        if unknown:
            raise ConfigError(f"preset {preset.name!r} sets {unknown} that {nb}.ipynb does not "
                              f"declare; add them to its parameters cell or fix the preset")


# ----------------------------------------------------------------------------- execution
_RERUN = ("everything finished before is kept, so fix the cause and run the same command again "
          "to continue")


@dataclass(frozen=True)
class StepFailure:
    """One failed step: which, where it raised, why, and the file that holds the traceback.

    `cause` (the exception's name and message) is what several failures are grouped by: one fault
    that stops every run of a study is said once, with the first file to read and a log of all.
    """

    step: str      # "[3/13] CCL seed 0: task sequence"
    where: str     # "notebooks/task_sequence.ipynb, cell 3 (In [2]: `...`)" or "cclnb (in process)"
    cause: str     # "ConfigError: --epochs must be >= 1, got 0"
    trace: Path    # the executed notebook, or the log holding the traceback

    def __str__(self) -> str:
        return f"{self.step} failed in {self.where}: {self.cause}. The traceback is in {self.trace}"


def _notebook_failure(step: Step, index: int, total: int, cell: str, cause: str,
                      trace: Path | None = None) -> StepFailure:
    where = f"notebooks/{step.notebook}.ipynb" + (f", {cell}" if cell else "")
    return StepFailure(f"[{index}/{total}] {step.label}", where, cause, trace or step.output)


def _failed(failures: Sequence[StepFailure], log: Path) -> StudyStepFailed:
    """The study's failed steps as one error. One failure is said in full; several are grouped
    by cause, each cause once with its count and first traceback, and every failure is listed in
    `log` (written here)."""
    if len(failures) == 1:
        return StudyStepFailed(failures, f"{failures[0]}; {_RERUN}")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"{failure}\n" for failure in failures), encoding="utf-8")
    groups: dict[str, list[StepFailure]] = {}
    for failure in failures:
        groups.setdefault(failure.cause, []).append(failure)
    causes = "; ".join(f"{len(group)} run{'s' if len(group) > 1 else ''} failed: {cause} "
                       f"(first: {group[0].trace}; all: {log})" for cause, group in groups.items())
    return StudyStepFailed(failures, f"{causes}. {_RERUN[0].upper()}{_RERUN[1:]}")


def _cell_detail(cell_index: int, exec_count: int | None, source: str, ename: str,
                 evalue: str) -> tuple[str, str]:
    """(the cell, the cause) of a notebook's error."""
    first_line = next((line for line in source.splitlines() if line.strip()), "")
    return f"cell {cell_index} (In [{exec_count}]: `{first_line.strip()}`)", f"{ename}: {evalue}"


def _subprocess_failure(step: Step, index: int, total: int) -> StepFailure:
    """A notebook run in its own process failed: the first cell with an error output in its
    executed copy; without one, its log (papermill's own error, or the kernel's death)."""
    import nbformat

    log = step.output.with_suffix(".log")
    if not step.output.is_file():
        return _notebook_failure(step, index, total, "", "stopped before the notebook started (no "
                                 "executed copy was written)", log)
    nb = nbformat.read(str(step.output), as_version=4)
    for cell_index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return _notebook_failure(step, index, total, *_cell_detail(
                    cell_index, cell.get("execution_count"), cell.source, out.get("ename", "?"),
                    out.get("evalue", "")))
    return _notebook_failure(step, index, total, "", "the kernel died or was killed without a cell "
                             "error (out of memory?)", log)


def execute_step(step: Step, notebooks_dir: str | Path | None = None) -> None:
    """Run one notebook in-process through papermill (the kernel is the venv's python3).

    The notebook's own output (the trainer's and evaluation's tqdm bars) is streamed to this
    terminal as it runs, so a long step shows its progress rather than one silent cell.
    """
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    step.output.parent.mkdir(parents=True, exist_ok=True)  # papermill does not create it
    try:
        papermill.execute_notebook(str(notebook_path(step.notebook, notebooks_dir)), str(step.output),
                                   parameters=step.parameters, kernel_name="python3",
                                   progress_bar=False, log_output=True, stdout_file=sys.stdout,
                                   stderr_file=sys.stderr, cwd=str(step.output.parent),
                                   extra_arguments=list(KERNEL_ARGUMENTS))
    except PapermillExecutionError as error:
        raise _StepError(*_cell_detail(error.cell_index, error.exec_count, error.source,
                                       error.ename, error.evalue)) from error
    except DeadKernelError as error:
        raise _StepError("", f"the kernel died ({error}); out of memory?") from error


class _StepError(Exception):
    """Internal: a step failed in (cell, cause); `run_study` adds the step's number and label."""


def _launch(step: Step, notebooks_dir: str | Path | None, threads: int, pinned: bool = False,
            **popen: Any) -> subprocess.Popen:
    """Start papermill for `step` as its own process, its output in `<output>.log`; the kernel
    gets `threads` CPU threads (OMP_NUM_THREADS; unless `pinned`, a value the caller set wins) so
    that concurrent notebooks share the cores instead of oversubscribing them. `popen`: further
    `subprocess.Popen` arguments (a cluster job starts its notebooks deaf to the scheduler's
    signals, `cclnb.launch.job`)."""
    step.output.parent.mkdir(parents=True, exist_ok=True)
    params_file = step.output.with_suffix(".parameters.json")
    params_file.write_text(json.dumps(step.parameters, indent=1))
    command = [sys.executable, "-m", "papermill", str(notebook_path(step.notebook, notebooks_dir)),
               str(step.output), "-f", str(params_file), "-k", "python3", "--no-progress-bar",
               "--log-output", "--cwd", str(step.output.parent)]
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}
    if pinned:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(step.output.with_suffix(".log"), "w", encoding="utf-8") as log:  # the child keeps its copy
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, **popen)


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Within: torch in this process, and any kernel started here, use `threads` CPU threads
    (None: nothing changes). The steps that run in the study's process or in a kernel it starts
    (the untrained baselines, `--jobs 1`) then compute as the concurrent notebooks do."""
    if threads is None:
        yield
        return
    import torch

    before, before_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if before_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_env


def _run_action(step: Step, index: int, total: int, log: Callable[[str], None]) -> StepFailure | None:
    """An in-process step (untrained encoder, record): short, so one line when done. A failure's
    traceback goes to the step's log, and is returned to be reported with the others."""
    tic = time.monotonic()
    try:
        step.action()
    except CclnbError as error:
        step.log.parent.mkdir(parents=True, exist_ok=True)
        step.log.write_text(traceback.format_exc(), encoding="utf-8")
        return StepFailure(f"[{index}/{total}] {step.label}", "cclnb (in process)",
                           f"{type(error).__name__}: {error}", step.log)
    log(f"[{index}/{total}] {step.label}: done in {time.monotonic() - tic:.0f} s ({step.output})")
    return None


def _run_concurrently(pending: list[tuple[int, Step]], study: Study, notebooks_dir: str | Path | None,
                      log: Callable[[str], None], total: int) -> list[StepFailure]:
    """Run the groups of `pending` (each group's steps in order) with up to `study.jobs` notebooks
    at once, each on `study.threads` threads. A failed step drops the rest of its group; the other
    groups finish; returns the failures."""
    queues: dict[str, list[tuple[int, Step]]] = {}
    for index, step in pending:
        queues.setdefault(step.group, []).append((index, step))
    jobs, threads, pinned = study.jobs, study.threads, study.preset.threads is not None
    running: dict[str, tuple[int, Step, subprocess.Popen, float]] = {}
    failures: list[StepFailure] = []
    while queues or running:
        for group in [g for g in queues if g not in running]:
            if len(running) >= jobs:   # in-process steps take a slot too: the CPU is shared
                break
            queue = queues[group]
            while queue and queue[0][1].action is not None:
                index, step = queue.pop(0)
                with pinned_threads(study.preset.threads):
                    failure = _run_action(step, index, total, log)
                if failure is not None:
                    failures.append(failure)
                    queue.clear()
            if queue and len(running) < jobs:
                index, step = queue.pop(0)
                log(f"[{index}/{total}] {step.label} ... (log {step.output.with_suffix('.log')})")
                running[group] = (index, step, _launch(step, notebooks_dir, threads, pinned=pinned), time.monotonic())
            if not queue:
                del queues[group]
        time.sleep(0.2)
        for group, (index, step, proc, tic) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[group]
            if proc.returncode == 0:
                log(f"[{index}/{total}] {step.label}: done in {time.monotonic() - tic:.0f} s")
            else:
                failures.append(_subprocess_failure(step, index, total))
                queues.pop(group, None)
    return failures


def render_html(executed: Path, html: Path) -> Path:
    """The executed report notebook as one offline HTML page: code hidden, images embedded."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(executed), as_version=4))
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(body, encoding="utf-8")
    return html


def run_study(study: Study, notebooks_dir: str | Path | None = None,
              log: Callable[[str], None] = print) -> Path:
    """Execute the plan's pending steps and render the report; returns index.html.

    With `study.jobs` > 1, up to that many (method, seed) runs proceed at once, each notebook
    in its own papermill process (output in `<notebook>.log` beside its executed copy); else
    every step runs in this process, in order, its output streamed here. The report comes last.
    First the pre-flight (`cclnb.preflight`) checks everything knowable before a step starts, and
    only then does --force delete the runs it names. A failure raises StudyStepFailed naming the
    step and the file with its traceback (after the concurrent runs have finished; several failures
    are grouped by cause and listed in `runs/<study>/failures.log`).
    """
    from cclnb.preflight import check_study

    check_study(study)
    for run_dir in study.forced:
        shutil.rmtree(run_dir)
    failures_log = study.runs_dir / "failures.log"
    total = len(study.steps)
    numbered = list(enumerate(study.steps, start=1))
    started = time.monotonic()
    for index, step in numbered:
        if step.done:
            log(f"[{index}/{total}] {step.label}: already complete, skipped ({step.output.parent})")
    pending = [(i, s) for i, s in numbered if not s.done]
    if study.jobs > 1:
        failures = _run_concurrently(pending[:-1], study, notebooks_dir, log, total)
        if failures:
            raise _failed(failures, failures_log)
        pending = pending[-1:]
    for index, step in pending:
        if step.action is not None:
            with pinned_threads(study.preset.threads):
                failure = _run_action(step, index, total, log)
            if failure is not None:
                raise _failed([failure], failures_log)
            continue
        log(f"[{index}/{total}] {step.label} ...")
        tic = time.monotonic()
        try:
            with pinned_threads(study.preset.threads):
                execute_step(step, notebooks_dir)
        except _StepError as error:
            raise _failed([_notebook_failure(step, index, total, *error.args)],
                          failures_log) from error.__cause__
        log(f"[{index}/{total}] {step.label}: done in {time.monotonic() - tic:.0f} s")
    html = render_html(study.steps[-1].output, study.html)
    log(f"study {study.name!r} finished in {time.monotonic() - started:.0f} s; report: {html}")
    return html
