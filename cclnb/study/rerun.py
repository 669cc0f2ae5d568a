"""A rerun of `cclnb study` compares before it skips: a finished (method, seed) is reused only if it
is what the command would run now.

Why: a finished run is skipped by the next call of the study. On a finished demo study,
`-p lr=0.05` said "already complete, skipped" for every step, exited 0 and re-rendered the report
from runs made with lr 0.1, while `cclnb train --resume` refuses a different configuration.

So before anything runs, every finished run's `config.json` (its resolved TrainConfig) is compared
with the configuration this command would build for it, resolved as the trainer resolves it (the
method's options, the image size and loader from the data, `auto` precision kept as the run chose
it), every field that defines the experiment (not the runtime-only ones of
`aggregate.RUNTIME_FIELDS`); and every finished linear evaluation's protocol and epochs with this
command's. Differences stop the study (`refusal`) naming them and the two ways on: another
`--study` name, or `--rerun-changed`, which moves the changed runs and their records aside
(`move_aside`, to `runs/<study>/.replaced/<method>/seed<k>-<time>/`, the record beside the run as
`record.json`) and runs them afresh. A record is thus only ever written from a run this command
would make: records of two configurations never mix in one study.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from cclnb.errors import ConfigError
from cclnb.study.aggregate import comparable_settings
from cclnb.study.plan import Step, Study, train_config, untrained_config
from cclnb.study.records import PROVENANCE_FIELDS

REPLACED = ".replaced"      # runs/<study>/.replaced/<method>/seed<k>-<time>/: runs --rerun-changed moved aside
_NAMED = 3                  # runs named in a refusal before "and N more"


def changed_runs(study: Study) -> dict[str, list[str]]:
    """{group ("CCL seed 0"): its differences ("lr: they have 0.1, this command 0.05")} for every
    finished (method, seed) of `study` made with other parameters than its plan's. Reads only."""
    opened: dict[tuple, int | None] = {}
    changed: dict[str, list[str]] = {}
    for step in study.steps:
        if not step.done:
            continue
        if step.notebook in ("task_sequence", "untrained"):
            found = _training_differences(step, opened)
        elif step.notebook == "linear_eval":
            found = _evaluation_differences(step)
        else:
            continue
        if found:
            changed.setdefault(step.group, []).extend(found)
    return changed


def _training_differences(step: Step, opened: dict[tuple, int | None]) -> list[str]:
    """How the finished run of `step` differs from what `step` would train: its config.json against
    the step's config, resolved as the trainer resolves a resume (`lifecycle.start_run`)."""
    from cclnb.data import open_run_data, run_data_key
    from cclnb.training import resolve_config

    saved_file = Path(step.parameters["run_dir"]) / "config.json"
    if not saved_file.is_file():       # not a run cclnb wrote: the record step will say so
        return []
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    config = (train_config if step.notebook == "task_sequence" else untrained_config)(step.parameters)
    key = run_data_key(config)
    if key not in opened:
        opened[key] = open_run_data(config, "train").image_size
    # `auto` precision was resolved when the run started; a resume keeps that choice, so does this
    precision = saved.get("precision", config.precision) if config.precision == "auto" else config.precision
    resolved = resolve_config(dataclasses.replace(config, precision=precision, seed=saved.get("seed")),
                              opened[key], torch.device("cpu"))
    planned = resolved.to_dict()
    if step.notebook == "untrained":
        planned["method"] = saved.get("method")   # the baseline records itself as untrained(-bn)
    # a field (or method option) the run predates counts as its default, which is what its code
    # ran with (new fields default to the old behaviour), as records are compared
    defaults = train_config({"method": config.method}).to_dict()
    return _differences({**defaults, **saved}, planned)


def _differences(saved: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """The defining fields (as records compare them, `aggregate.comparable_settings`) on which a
    saved config.json and a planned config disagree; provenance (config.json's world_size is the
    job's, not the flag) is no setting."""
    theirs, ours = ({k: v for k, v in comparable_settings(c).items() if k not in PROVENANCE_FIELDS}
                    for c in (saved, planned))
    return [f"{key}: they have {theirs.get(key)!r}, this command {ours.get(key)!r}"
            for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]


def _evaluation_differences(step: Step) -> list[str]:
    """A finished linear evaluation's protocol and epochs against the step's."""
    result_file = Path(step.parameters["run_dir"]) / f"lincls_{step.parameters['who']}.json"
    try:
        result = json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    protocol = "probe" if str(result.get("protocol", "")).startswith("probe") else "lincls"
    saved = {"protocol": protocol, "epochs": result.get("epochs")}
    planned = {"protocol": step.parameters.get("protocol"), "epochs": step.parameters.get("epochs")}
    return [f"linear_eval.{key}: they have {saved[key]!r}, this command {planned[key]!r}"
            for key in saved if saved[key] != planned[key]]


def refusal(study: Study, changed: Mapping[str, list[str]]) -> ConfigError:
    """The error that stops the study: the changed runs, grouped by their differences."""
    by_difference: dict[str, list[str]] = {}
    for group, found in changed.items():
        by_difference.setdefault("; ".join(dict.fromkeys(found)), []).append(group)
    parts = []
    for difference, groups in by_difference.items():
        names = ", ".join(groups[:_NAMED]) + (f" and {len(groups) - _NAMED} more" if len(groups) > _NAMED else "")
        parts.append(f"{names}: {difference}")
    count = len(changed)
    return ConfigError(
        f"{count} finished run{'s' if count > 1 else ''} of study '{study.name}' {'were' if count > 1 else 'was'} "
        f"made with other parameters than this command's: {' | '.join(parts)}. Nothing was run. To keep "
        f"them, give this command's runs another --study NAME; to replace them, add --rerun-changed (the old "
        f"runs and their records move to {study.runs_dir / REPLACED})")


def compared(study: Study) -> tuple[Study, dict[str, list[str]]]:
    """(the study to run, its changed runs): refused when runs changed and `study.rerun_changed` is
    not set; else with the changed runs planned afresh (`move_aside` moves them, under the lock)."""
    changed = changed_runs(study)
    if changed and not study.rerun_changed:
        raise refusal(study, changed)
    return planned_afresh(study, changed), changed


def planned_afresh(study: Study, groups: Mapping[str, Any]) -> Study:
    """`study` with the steps of `groups` planned as if their runs did not exist (as --force
    plans them): nothing done, no resume."""
    steps = []
    for step in study.steps:
        if step.group in groups:
            parameters = {**step.parameters, "resume": None} if "resume" in step.parameters else step.parameters
            step = dataclasses.replace(step, done=False, parameters=parameters)
        steps.append(step)
    return dataclasses.replace(study, steps=steps)


def move_aside(study: Study, groups: Mapping[str, Any], stamp: str) -> list[Path]:
    """Move the run directory of every group of `groups`, and its record, to
    `runs/<study>/.replaced/<method>/seed<k>-<stamp>/` (the record as `record.json`); returns
    where they went. Run under the study's lock, after the pre-flight."""
    moved = []
    for group in groups:
        steps = [s for s in study.steps if s.group == group]
        run_dir = Path(steps[0].parameters["run_dir"])
        aside = study.runs_dir / REPLACED / run_dir.parent.name / f"{run_dir.name}-{stamp}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir), str(aside))
        record = next((s.output for s in steps if s.notebook == "record"), None)
        if record is not None and record.is_file():
            shutil.move(str(record), str(aside / "record.json"))
        moved.append(aside)
    return moved
