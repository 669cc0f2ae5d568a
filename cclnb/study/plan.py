"""A study's plan: the ordered steps of every (method, seed), resolved before anything runs.

A study is, for every seed: the task-sequence notebook once per method (pretraining over the
task sequence), the untrained encoder those runs start from, as built and with BatchNorm statistics
of the data (`cclnb.study.baseline`), the linear-evaluation notebook for each encoder (student, and
the teacher where the method has one; with `Preset.inline_probe` the probe in this process), and a record of each finished (method, seed) in
`reports/<study>/runs/` (`cclnb.study.records`); then the report notebook, which reads only records.
A finished step is skipped on the next call.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cclnb.config import TrainConfig
from cclnb.errors import ConfigError, DataError
from cclnb.study.notebooks import (NOTEBOOKS, notebook_defaults, notebook_parameters, notebook_path,
                                   split_overrides)
from cclnb.study.presets import Preset, check_preset, get_preset
from cclnb.study.records import RECORDS_FOLDER, record_name
from cclnb.study.report import BASELINES, UNTRAINED_BN
from cclnb.training.methods import registry


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
    cost: float = 1.0                # expected time relative to a plain MoCo run: concurrent jobs start the longest first


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
    rerun_changed: bool = False      # finished runs made with other parameters: run afresh, not refused (study.rerun)

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
    """The resolved TrainConfig the task-sequence notebook builds from these parameters (its names
    are TrainConfig fields; `extra` holds method options and any other field; `torchrun_args` says
    how to launch it)."""
    values = {k: v for k, v in parameters.items() if k not in ("extra", "torchrun_args")}
    return registry.resolve(TrainConfig.from_dict({**values, **(parameters.get("extra") or {})}))


def untrained_config(parameters: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of an untrained-baseline step: the task-sequence one under the plainest
    method, Finetuning (the baseline never trains and records itself as untrained)."""
    return train_config({**parameters, "method": "Finetuning"})


def _untrained(parameters: Mapping[str, Any], calibrate_bn: bool) -> Path:
    from cclnb.study.baseline import untrained_run

    # it runs in the study's own process: its progress bars would interleave with the step lines
    return untrained_run(untrained_config({**parameters, "progress": False}), calibrate_bn)


def _probe(parameters: Mapping[str, Any], log: Path) -> Path:
    """A linear evaluation by the probe protocol in the study's own process (`Preset.inline_probe`):
    the linear-evaluation notebook's one call, from the same parameters, its result line in `log`."""
    from cclnb.evaluate.lincls import probe_eval
    from cclnb.evaluate.lincls_options import notebook_args

    result = probe_eval(notebook_args({**parameters, "progress": False}))
    log.write_text(f"{result['who']} ({result['protocol']}): final top-1 {result['top1']:.2f}% "
                   f"in {result['time_s']:.1f} s\nparameters: {json.dumps(dict(parameters))}\n", encoding="utf-8")
    return log


def _evaluation_step(label: str, run_dir: Path, who: str, seed: int, trained: bool,
                     notebook: Mapping[str, Any], inline: Mapping[str, Any] | None) -> Step:
    """The linear evaluation of one encoder: the notebook, or with `inline` parameters the probe
    in this process (its output the JSON both write)."""
    done = trained and (run_dir / f"lincls_{who}.json").is_file()
    where = {"run_dir": str(run_dir), "who": who, "seed": seed}
    if inline is None:
        return Step(label, "linear_eval", run_dir / f"linear_eval_{who}.ipynb", {**notebook, **where}, done=done)
    parameters = {**inline, **where}
    log = run_dir / f"linear_eval_{who}.log"
    return Step(label, "linear_eval", run_dir / f"lincls_{who}.json", parameters, done=done,
                action=functools.partial(_probe, parameters, log), log=log)


def _record(run_dir: Path, folder: Path, study: str) -> Path:
    from cclnb.study.records import write_record

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
               notebooks_dir: str | Path | None = None, rerun_changed: bool = False) -> Study:
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
    `rerun_changed`: `run_study` runs afresh, instead of refusing, the finished runs made with
    other parameters than these (`cclnb.study.rerun`).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    module = _method_module(overrides, preset)
    if module:
        registry.load(module)
    specs = study_specs(notebooks_dir)
    routed = split_overrides(overrides, specs, preset)
    params = {nb: {**preset.parameters(nb), **routed[nb]} for nb in NOTEBOOKS}
    check_preset(preset, specs)
    params["task_sequence"] = _options_into_extra(params["task_sequence"], registry.option_specs())
    data = params["task_sequence"].get("data")
    if data is None:
        raise ConfigError(f"preset {preset.name!r} needs its data: pass -p data=PATH "
                          f"({preset.data_hint or 'the dataset location'})")
    # The notebooks run in other working directories: a path relative to the caller's must reach
    # them absolute (the data, a method's file).
    if data != "demo" and Path(data).exists():
        params["task_sequence"]["data"] = str(Path(data).resolve())
    if module and Path(module).is_file():
        params["task_sequence"]["method_module"] = str(Path(module).resolve())
    # one run per method however often it is named (an alias included), as --seeds
    chosen = list(dict.fromkeys(registry.canonical_name(m) for m in (methods or preset.methods)))
    chosen_seeds = _seeds(seeds, preset)
    name = _study_name(preset.name if study is None else study)
    runs_dir = Path(runs_root).resolve() / name
    report_dir = Path(reports_root).resolve() / name
    records_dir = report_dir / RECORDS_FOLDER
    # The probe in this process (Preset.inline_probe) gets every parameter the notebook would hold.
    evaluation = {**notebook_defaults(specs["linear_eval"]), **params["linear_eval"]}
    inline = preset.inline_probe and evaluation.get("protocol") == "probe"
    steps: list[Step] = []
    forced: list[Path] = []
    for seed in ([] if report_only else chosen_seeds):
        for method in [*chosen, *(BASELINES if baseline else ())]:
            run_dir = runs_dir / method / f"seed{seed}"
            if force and run_dir.exists():
                forced.append(run_dir)
            steps += _method_steps(method, seed, run_dir, params, records_dir, name, fresh=force,
                                   inline_evaluation=evaluation if inline else None)
    folders = [str(records_dir), *(str(Path(f).resolve()) for f in records)]
    steps.append(Step("report", "report", runs_dir / "report.ipynb",
                      {**params["report"], "study": name, "records": folders,
                       "budget": _budget_folders(params["report"].get("budget") or []),
                       "out_dir": str(report_dir)}))
    jobs = preset.jobs if jobs is None else jobs
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (1 runs one notebook at a time), got {jobs}")
    return Study(name, preset, runs_dir, report_dir, steps, jobs, chosen_seeds, tuple(forced), rerun_changed)


_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _study_name(name: str) -> str:
    """`name` if it is one safe folder name: `runs/<study>` and `reports/<study>` must stay inside
    --runs-root and --reports-root (`../../escape` once wrote runs and report into one folder
    outside both; `a b/c` nested folders)."""
    if not _STUDY_NAME.fullmatch(name):
        raise ConfigError(f"--study {name!r}: a study name is one folder name under --runs-root and "
                          f"--reports-root: letters, digits and . _ - (not first), e.g. --study demo-lr0.05")
    return name


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
                  records_dir: Path, study: str, fresh: bool,
                  inline_evaluation: Mapping[str, Any] | None = None) -> list[Step]:
    """Pretraining (or the untrained encoder), linear evals and the record of one (method, seed);
    `fresh`: as if `run_dir` were empty (--force deletes it before the first step);
    `inline_evaluation`: the linear evals' parameters, to run them in this process, not notebooks."""
    trained = not fresh and _training_done(run_dir)
    keeps_teacher = method not in BASELINES and registry.method_class(method).keeps_teacher
    who_list = ("student", "teacher") if keeps_teacher else ("student",)
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
    evals = [_evaluation_step(f"{label}: linear eval ({who})", run_dir, who, seed, trained,
                              params["linear_eval"], inline_evaluation) for who in who_list]
    record = Step(f"{label}: record", "record", records_dir / record_name(method, seed), {},
                  action=functools.partial(_record, run_dir, records_dir, study), log=run_dir / "record.log")
    steps = [first, *evals, record]
    for step in steps:
        step.group, step.cost = label, expected_cost(method)
    return steps


def expected_cost(method: str) -> float:
    """How long a (method, seed) takes relative to Finetuning's, for ordering concurrent jobs:
    the method's declared `step_cost` (CCL and its ablations 1.7: a third encoder, the teacher),
    0 for the untrained baselines, which take seconds.

    Why: with jobs in parallel, a study whose longest runs start last ends with one core idle
    while they finish (the demo: CCL seed 2 ran alone for ~35 s of its 327 s). Starting the
    longest first (LPT) packs the cores. Only the order depends on it: every step is the same
    whenever it runs."""
    if method in BASELINES:
        return 0.0
    return registry.method_class(method).step_cost


def study_specs(notebooks_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """What `-p` and a preset may set, per notebook: each notebook's parameters cell, and for the
    task sequence also every registered method's options (they reach the notebook in `extra`)."""
    specs = {nb: notebook_parameters(notebook_path(nb, notebooks_dir)) for nb in NOTEBOOKS}
    specs["task_sequence"] = {**registry.option_specs(), **specs["task_sequence"]}
    return specs


def _method_module(overrides: Sequence[str], preset: Preset) -> str | None:
    """The `method_module` a study's methods may come from (-p method_module=..., else the preset's)."""
    for pair in overrides:
        key, _, value = pair.partition("=")
        if key.strip().rpartition(".")[2] == "method_module" and value.strip() not in ("", "None"):
            return value.strip()
    return preset.parameters("task_sequence").get("method_module")


def _options_into_extra(parameters: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The task-sequence parameters with every method option moved into `extra` (the notebook
    declares only TrainConfig's fields; a method's options are the method's business)."""
    moved = {k: v for k, v in parameters.items() if k in options}
    kept = {k: v for k, v in parameters.items() if k not in options}
    if moved:
        kept["extra"] = {**moved, **(kept.get("extra") or {})}
    return kept
