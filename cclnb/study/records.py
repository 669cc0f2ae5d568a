"""Study records: the small committed summary of one finished (method, seed) run, no weights.

A study's report is built from records, not from run directories, because run directories are
big, git-ignored and tied to one machine, while GPU time comes in short windows on different
machines: a record written on one machine and committed (or copied) into
`reports/<study>/runs/` joins the study on every other. One record is one JSON file,
`<method>-seed<k>.json`, holding what the report needs and where it came from:

- `config`: the resolved TrainConfig of the run (what decides whether two records may be averaged);
- `final`: the final evaluation of the student (and teacher) with its protocol settings and curve;
- `accuracy`: every per-task accuracy matrix (`<protocol>_<who>` -> after_task, columns, values);
- `train_loss`: one row per (task, epoch): mean losses and lr, median img/s, elapsed time;
- `throughput` and `provenance` (commit, device, versions, start date, the data the run read).

Paths in a record are relative to the *run root*, the folder that holds `<study>/<method>/seed<k>`
(`runs/` by default): `config.run_dir` reads `tin100-32-cpu-w16/CCL/seed0`, and a dataset outside
it reads `../../shared/data/...`. A committed record then names no machine's folders. Records written
before that hold absolute paths; `read_record` reads them as if migrated, and `migrate_records`
rewrites their files (`cclnb report migrate`).

`as_run` turns a record back into a `cclnb.study.report.Run`, so every table and figure of the report
works the same on records as on run directories.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cclnb.errors import DataError
from cclnb.study import aggregate, report
from cclnb.training.runs import write_json

FORMAT = "cclnb-record-v1"
RECORDS_FOLDER = "runs"            # reports/<study>/runs/
PROVENANCE_FIELDS = ("git_commit", "versions", "hardware", "started", "world_size", "data_identity")
# Keys of a lincls/probe result that are not results: local paths and the full flag dump.
_FINAL_DROP = ("config", "pretrained")
_FINAL_SETTINGS = ("lr", "batch_size", "schedule", "precision", "subset_per_class", "momentum", "wd")
RUN_DEPTH = 3                      # a study's run directory is <run root>/<study>/<method>/seed<k>


def record_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}.json"


@dataclass(frozen=True)
class Record:
    """A record as read from `source` (the file), with its content in `data`."""

    source: str
    data: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.data["method"])

    @property
    def seed(self) -> int:
        return int(self.data["seed"])

    @property
    def config(self) -> dict[str, Any]:
        return self.data["config"]

    @property
    def settings(self) -> dict[str, Any]:
        """What decides whether two records are the same experiment: the training config and
        the final evaluation's protocol, epochs and optimiser settings of each encoder."""
        final = {who: {k: result.get(k) for k in ("protocol", "epochs", "settings")}
                 for who, result in self.data["final"].items()}
        return {**self.config, "final_evaluation": final}


# ----------------------------------------------------------------------------- paths
def run_root(run_dir: str) -> PurePosixPath:
    """The run root of an absolute study run directory: `RUN_DEPTH` folders up (`/`, for a run
    directory that lies less deep)."""
    path = PurePosixPath(run_dir)
    return path.parents[min(RUN_DEPTH - 1, len(path.parents) - 1)]


def relative_paths(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with every absolute path (run_dir, data, resume, ...) relative to the run root of its
    `run_dir`. A config whose run_dir is already relative (or absent) is returned as it is, so this
    is idempotent: a migrated record stays as it is."""
    where = config.get("run_dir")
    if not isinstance(where, str) or not os.path.isabs(where):
        return dict(config)
    root = run_root(where)
    return {key: (os.path.relpath(value, root) if isinstance(value, str) and os.path.isabs(value) else value)
            for key, value in config.items()}


# ----------------------------------------------------------------------------- writing
def _train_loss_summary(log: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, epoch) of a train_log.csv: the mean of the logged losses and lr, the
    median img/s, the last global step and elapsed time."""
    # the loss columns the run logged (total, MoCo, the method's terms) and the lr
    means = [c for c in log.columns if c == "loss" or c.startswith("loss_")] + ["lr"]
    if log.empty:
        return pd.DataFrame(columns=["task", "epoch", "global_step", *means, "img_per_s", "time_s"])
    grouped = log.groupby(["task", "epoch"], sort=True)
    summary = grouped[means].mean()
    summary["global_step"] = grouped["global_step"].max()
    summary["img_per_s"] = grouped["img_per_s"].median()
    summary["time_s"] = grouped["time_s"].max()
    return summary.reset_index()[["task", "epoch", "global_step", *means, "img_per_s", "time_s"]]


def _final(result: dict[str, Any]) -> dict[str, Any]:
    settings = result.get("config") or {}
    kept = {k: v for k, v in result.items() if k not in _FINAL_DROP}
    kept["settings"] = {k: settings[k] for k in _FINAL_SETTINGS if k in settings}
    return kept


def _frame_payload(frame: pd.DataFrame) -> dict[str, Any]:
    return {"after_task": [int(i) for i in frame.index], "columns": list(frame.columns),
            "values": [[float(v) for v in row] for row in frame.to_numpy()]}


def _finite(value: Any) -> Any:
    """JSON has no NaN: missing numbers become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def make_record(run: report.Run, study: str) -> dict[str, Any]:
    """The record of a finished run (its config, final evaluations, matrices, losses, provenance).
    Refuses a run that is not complete: a record is a result."""
    if not run.complete:
        raise DataError(f"{run.path} is not complete (state {run.status.get('state')!r}); finish it "
                        f"(run the study again to resume) before recording it")
    if run.config.get("seed") is None:
        raise DataError(f"{run.path}/config.json has no seed; a record is keyed by its seed")
    method = run.method
    config = relative_paths({k: v for k, v in run.config.items() if k not in PROVENANCE_FIELDS})
    loss = _train_loss_summary(run.train_log)
    times = report.throughput_table([run]).iloc[0]
    hardware = run.config.get("hardware") or {}
    return {
        "format": FORMAT, "study": study, "method": method, "seed": int(run.config["seed"]),
        "state": "complete", "config": config,
        "final": {who: _final(result) for who, result in sorted(run.lincls.items())},
        "accuracy": {f"{protocol}_{who}": _frame_payload(frame)
                     for (protocol, who), frame in sorted(run.accuracy.items())},
        "train_loss": {"columns": list(loss.columns),
                       "rows": [[_finite(float(v)) for v in row] for row in loss.to_numpy()]},
        "throughput": {"median_img_per_s": _finite(float(times["median_img_per_s"])),
                       "train_time_s": _finite(float(times["train_time_s"])),
                       "steps": int(times["steps"])},
        "provenance": {"git_commit": run.config.get("git_commit"),
                       "device": report.device_label(hardware),
                       "hardware": hardware, "versions": run.config.get("versions") or {},
                       "torch": (run.config.get("versions") or {}).get("torch"),
                       "started": run.config.get("started"),
                       "world_size": run.config.get("world_size"),
                       # the data the run read (cclnb.data.fingerprint); None: trained before it was kept
                       "data_identity": run.config.get("data_identity")},
    }


def write_record(run_dir: str | Path, folder: str | Path, study: str) -> Path:
    """Record the finished run in `run_dir` as `folder/<method>-seed<k>.json` (atomic write)."""
    record = make_record(report.load_run(run_dir), study)
    path = Path(folder) / record_name(record["method"], record["seed"])
    write_json(path, record)
    return path


# ----------------------------------------------------------------------------- reading
def read_record(path: str | Path) -> Record:
    """One record file; anything else is a DataError naming the file and what to do. A record with
    absolute paths (written before they became relative) is read with relative ones, as migrated."""
    data = _read_raw(Path(path))
    return Record(str(path), {**data, "config": relative_paths(data["config"])})


def _read_raw(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{file} is not valid JSON ({error}); restore it "
                        f"from git or delete it and run that (method, seed) again") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{file} is not a cclnb study record (no \"format\": {FORMAT!r}); keep only "
                        f"records written by `cclnb study` in a records folder")
    missing = [k for k in ("method", "seed", "config", "final", "accuracy", "train_loss") if k not in data]
    if missing:
        raise DataError(f"{file} lacks {missing}; it was cut or edited by hand: restore it from git")
    return data


def record_files(folders: Sequence[str | Path]) -> list[Path]:
    """The `*-seed*.json` files of `folders`, in folder order then by name (absent folders: none)."""
    return [p for folder in folders if Path(folder).is_dir() for p in sorted(Path(folder).glob("*-seed*.json"))]


def migrate_records(folders: Sequence[str | Path]) -> list[Path]:
    """Rewrite every record in `folders` whose config holds absolute paths with paths relative to
    its run root (atomic writes; nothing else in the file changes). Returns the files rewritten;
    running it again rewrites none."""
    rewritten = []
    for file in record_files(folders):
        data = _read_raw(file)
        config = relative_paths(data["config"])
        if config != data["config"]:
            write_json(file, {**data, "config": config})
            rewritten.append(file)
    return rewritten


def load_records(folders: Sequence[str | Path]) -> list[Record]:
    """Every `*-seed*.json` record in `folders`, in folder order then by name (folders that do not
    exist are skipped: a study may not have records from another machine yet)."""
    return [read_record(p) for p in record_files(folders)]


def _frame(payload: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(payload["values"], columns=payload["columns"],
                         index=pd.Index(payload["after_task"], name="after_task"))
    return frame.astype(np.float64)


def as_run(record: Record) -> report.Run:
    """The record as a `report.Run` (config with provenance, complete, per-epoch train log)."""
    data = record.data
    provenance = data.get("provenance") or {}
    config = {**data["config"], **{k: provenance.get(k) for k in PROVENANCE_FIELDS if k in provenance}}
    loss = data["train_loss"]
    run = report.Run(path=Path(record.source), config=config, status={"state": data.get("state")},
                     train_log=pd.DataFrame(loss["rows"], columns=loss["columns"], dtype=np.float64))
    for key, payload in data["accuracy"].items():
        protocol, who = key.split("_", 1)
        run.accuracy[(protocol, who)] = _frame(payload)
    run.lincls = {who: dict(result) for who, result in data["final"].items()}
    return run


@dataclass(frozen=True)
class StudyResults:
    """What a report reads from records folders: every record, the comparable ones as runs (sorted),
    those left out of the averages and why, and one results row per kept run."""

    records: list[Record]
    runs: list[report.Run]
    refused: list[aggregate.Refusal]
    table: pd.DataFrame


def study_results(folders: Sequence[str | Path]) -> StudyResults:
    """Read `folders`' records and keep those that may be averaged (`aggregate.comparable`)."""
    found = load_records(folders)
    kept, refused = aggregate.comparable([(r.source, r.method, r.seed, r.settings) for r in found])
    runs = report.sort_runs([as_run(r) for r in found if r.source in kept])
    return StudyResults(found, runs, refused, report.results_table(runs))
