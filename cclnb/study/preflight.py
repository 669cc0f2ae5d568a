"""The pre-flight of `cclnb study`: every cause of failure that can be known is checked before the
first step starts.

Why: a study starts a notebook kernel for every (method, seed) and baseline. A cause that is
knowable in this process (a parameter out of range, a CUDA preset on a machine without CUDA, a
mistyped `--records` folder, an output folder that cannot be written, data that is not there)
would otherwise surface minutes later as one traceback per run, the same message 18 times for
the demo, or not at all: a `--records` folder that does not exist used to be skipped, silently
dropping another machine's results from the report.

So `check_study` builds, in this process, every configuration the pending steps would run, from
the parameters their notebooks would get, and runs the checks those notebooks (and the untrained
baseline) would run first: `TrainConfig.validate`, a `data` the dataset kind would not read,
the linear evaluation's flags, the device, the records, the output folders, the data and its task split. The first problem is raised as one
`CclnbError` naming the `-p` parameter or option to change, with the exit code the reliability
catalogue lists (docs/reliability.md). Nothing is written: writability is probed with a temporary
file removed at once. What costs nothing comes first; the data, whose index must be read, last.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from cclnb.config import TrainConfig
from cclnb.errors import CclnbError, ConfigError, DataError
from cclnb.study.plan import Step, Study, train_config, untrained_config

_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")
_NOTHING_WRITTEN = "checked before any step started; nothing was written"


def check_study(study: Study, here: bool = True) -> list[str]:
    """Raise the first problem that would stop a pending step of `study`; write nothing. Returns
    the notes worth reading before it starts: what would run but slowly (`_slow_precision`).
    `here=False`: the steps run on other machines (cluster jobs, `cclnb.launch`), so this machine's
    device and view of the data say nothing about them; each job checks them on its node."""
    pending = [step for step in study.steps if not step.done]
    configs = _training_configs(pending)
    _check_ignored_data(configs)
    if here:
        _check_device(configs, pending)
    _check_linear_evals(pending)
    _check_records(study, pending)
    _check_folders(study, pending)
    if here:
        _check_data(configs, pending)
    return _slow_precision(configs, pending) if here else []


def _slow_precision(configs: Sequence[tuple[Step, TrainConfig]], steps: Sequence[Step]) -> list[str]:
    """The note for pending steps that would run bf16 on a CPU that only emulates it, said once
    with the `-p` parameters that ask for it (a CPU preset pins bf16; see `emulated_bf16_note`)."""
    from cclnb.training.precision import emulated_bf16_note

    asked = [("-p precision", config.precision, config.device) for _, config in configs]
    asked += [("-p linear_eval.precision", step.parameters.get("precision", "auto"), step.parameters.get("device"))
              for step in steps if step.notebook == "linear_eval"]
    slow = dict.fromkeys(parameter for parameter, precision, device in asked
                         if precision == "bf16" and (device == "cpu" or not torch.cuda.is_available()))
    note = emulated_bf16_note("bf16", "cpu") if slow else None
    return [f"{note}; this study asks for it through {' and '.join(slow)}"] if note else []


def _raise_first(refused: Sequence[tuple[Step, CclnbError]], kind: str, notebook: str = "") -> None:
    """Raise the first cause in `refused` once, as `cclnb study` says it (same class and exit
    code): the first step it stops and how many more of its `kind` ("run"), the cause, and the `-p`
    parameter of each flag the message names (the notebooks' parameters carry the flags' names,
    `-` written `_`; `notebook` prefixes those of a notebook other than the task sequence)."""
    if not refused:
        return
    first, error = refused[0]
    others = sum(str(other) == str(error) for _, other in refused) - 1
    subject = first.label + (f" (and {others} more {kind}{'s' if others > 1 else ''})" if others else "")
    names = dict.fromkeys(flag.replace("-", "_") for flag in _FLAG.findall(str(error)))
    where = f" (in the study: {', '.join(f'-p {notebook}{name}=...' for name in names)})" if names else ""
    raise type(error)(f"{subject}: {error}{where}; {_NOTHING_WRITTEN}") from error


def _training_configs(steps: Sequence[Step]) -> list[tuple[Step, TrainConfig]]:
    """The TrainConfig of every pending pretraining and untrained-baseline step, checked as the
    task-sequence notebook (`validate`) and `untrained_run` check it."""
    from cclnb.study.baseline import check_config

    built: list[tuple[Step, TrainConfig]] = []
    refused: list[tuple[Step, CclnbError]] = []
    for step in steps:
        try:
            if step.notebook == "task_sequence":
                config = train_config(step.parameters)
                config.validate()
            elif step.notebook == "untrained":
                config = untrained_config(step.parameters)
                check_config(config)
            else:
                continue
        except CclnbError as error:
            refused.append((step, error))
            continue
        built.append((step, config))
    _raise_first(refused, "run")
    return built


def _check_ignored_data(configs: Sequence[tuple[Step, TrainConfig]]) -> None:
    """A `data` the dataset kind never reads: the embedded sets (`dataset=demo`, the demo preset's)
    read no file, so `-p data=/x.zip` trained the whole study on the shapes while every record
    named /x.zip."""
    from cclnb.data.source import DEMO_DATA

    for _, config in configs:
        if config.dataset == "demo" and config.data not in DEMO_DATA:
            raise ConfigError(f"-p data={config.data} is not read: the study's dataset is 'demo' (the embedded "
                              f"shapes, or data=demo-digits), which reads no file; to train on {config.data} add "
                              f"-p dataset=auto (or zip, imagefolder, cifar10, cifar100), or drop -p data; "
                              f"{_NOTHING_WRITTEN}")


def _check_device(configs: Sequence[tuple[Step, TrainConfig]], steps: Sequence[Step]) -> None:
    """A CUDA preset on a machine without CUDA: said once, for the training and the linear
    evaluation together, before any process would have found out."""
    if torch.cuda.is_available():
        return
    wanted: dict[str, str] = {}
    if any(config.device == "cuda" for _, config in configs):
        wanted["training"] = "-p device=cpu"
    if any(step.notebook == "linear_eval" and step.parameters.get("device") == "cuda" for step in steps):
        wanted["linear evaluation"] = "-p linear_eval.device=cpu"
    if wanted:
        ask = "ask" if len(wanted) > 1 else "asks"
        raise ConfigError(f"the study's {' and '.join(wanted)} {ask} for device=cuda, but no CUDA GPU is "
                          f"visible to PyTorch; add {' '.join(wanted.values())} (or auto) to run on the "
                          f"CPU, or run on a machine with a GPU; {_NOTHING_WRITTEN}")


def _check_linear_evals(steps: Sequence[Step]) -> None:
    """The linear-evaluation notebook's parameters, turned into `cclnb lincls` arguments and
    checked as the notebook's first cells would (the protocol's limit on the image size waits for
    the data, `_check_data`)."""
    from cclnb.evaluate.lincls import check_arguments
    from cclnb.evaluate.lincls_options import notebook_args

    refused: list[tuple[Step, CclnbError]] = []
    for step in steps:
        if step.notebook == "linear_eval":
            try:
                args = notebook_args(step.parameters)
                if args.protocol == "lincls":
                    check_arguments(args)
            except CclnbError as error:
                refused.append((step, error))
    _raise_first(refused, "linear eval", "linear_eval.")


def _check_records(study: Study, steps: Sequence[Step]) -> None:
    """Every `--records` folder must exist and hold records (a mistyped path would silently drop
    results from the report), and the report must have something to read."""
    from cclnb.study.records import load_records

    report = study.steps[-1]   # always planned, never skipped
    extra = [Path(folder) for folder in report.parameters["records"] if Path(folder) != study.records_dir]
    for folder in extra:
        if not folder.is_dir():
            raise DataError(f"--records {folder}: no such folder; check the path (a folder of study records "
                            f"<method>-seed<k>.json, such as another checkout's reports/<study>/runs) or "
                            f"drop that --records; {_NOTHING_WRITTEN}")
        if not load_records([folder]):
            raise DataError(f"--records {folder} holds no study records (<method>-seed<k>.json); check the "
                            f"path or drop that --records; {_NOTHING_WRITTEN}")
    planned = any(step.notebook == "record" for step in steps)
    if not planned and not load_records([study.records_dir, *extra]):   # also reads every record
        raise DataError(f"nothing to report: {study.records_dir} holds no study records and no run is "
                        f"planned; run the study without --report-only, or name a folder of records "
                        f"with --records DIR; {_NOTHING_WRITTEN}")


def _check_folders(study: Study, steps: Sequence[Step]) -> None:
    """Every folder a pending step writes to must be writable, or creatable (it is not created)."""
    from cclnb.training.runs import check_writable

    folders = {step.output.parent for step in steps} | {step.log.parent for step in steps if step.log}
    folders |= {Path(step.parameters["out_dir"]) for step in steps if step.notebook == "report"}
    for folder in sorted(folders):
        option = "--runs-root" if folder.is_relative_to(study.runs_dir) else "--reports-root"
        check_writable(folder, "output folder", option)


def _check_data(configs: Sequence[tuple[Step, TrainConfig]], steps: Sequence[Step]) -> None:
    """Open each dataset the runs name (both splits), split it into the runs' tasks, and check
    that the linear evaluation's protocol suits the runs' image size."""
    from cclnb.data import open_run_data, run_data_key
    from cclnb.evaluate.lincls import check_probe_size
    from cclnb.training import plan_tasks, resolve_config

    opened = {}
    image_size: dict[str | None, int] = {}   # run_dir -> the image size the run trains at
    refused: list[tuple[Step, CclnbError]] = []
    for step, config in configs:
        key = run_data_key(config)
        try:
            if key not in opened:
                opened[key], _ = (open_run_data(config, split) for split in ("train", "val"))
            train = opened[key]
            # on the CPU: only the image size is used here, and CUDA stays untouched in this process
            resolved = resolve_config(config, train.image_size, torch.device("cpu"))
            plan_tasks(resolved, train.targets, len(train.classes))
        except CclnbError as error:
            refused.append((step, error))
            continue
        image_size[config.run_dir] = resolved.image_size
    _raise_first(refused, "run")
    refused = []
    for step in steps:
        size = image_size.get(step.parameters.get("run_dir"))   # None: trained before, not checked
        if step.notebook == "linear_eval" and step.parameters.get("protocol") == "probe" and size is not None:
            try:
                check_probe_size(size)
            except CclnbError as error:
                refused.append((step, error))
    _raise_first(refused, "linear eval", "linear_eval.")
