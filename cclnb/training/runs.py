"""The run directory: everything a pretraining run leaves behind for notebooks and reports.

A run directory is the only interface between training and analysis (docs/architecture.md,
"Run directory"). Every file here is written atomically (temporary file + fsync + rename), so a run
killed at any moment leaves either the previous complete file or the new complete file, never a
half-written one that a notebook would misread.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import secrets
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cclnb.errors import CheckpointError, ConfigError
from cclnb.training.events import EventWriter

def log_columns(loss_terms: Sequence[str] = ()) -> tuple[str, ...]:
    """train_log.csv's columns: position, the total and MoCo losses, one `loss_<term>` per term
    the method declares (`Method.loss_terms`; CCL: extra, distill), lr, speed, time."""
    return ("task", "epoch", "step", "global_step", "loss", "loss_moco",
            *(f"loss_{term}" for term in loss_terms), "lr", "img_per_s", "time_s")


STATES = ("running", "complete", "failed", "interrupted")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temporary(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside `path`, open for writing, with the mode a plain `open` gives (0666 less
    the umask). Not mkstemp: its 0600 made records, configs and statuses unreadable to the
    colleagues a study on a shared file system is for, while the checkpoints beside them were 0644."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:   # another writer's temporary file: draw another name
            continue


def write_json(path: Path, payload: Any) -> None:
    _atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def default_run_dir(method: str, dataset_name: str, root: str | Path = "runs") -> Path:
    """`runs/<method>-<dataset name>-<timestamp>`; a numeric suffix keeps two runs started in the
    same second apart instead of mixing their files."""
    base = Path(root) / f"{method}-{dataset_name}-{timestamp()}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def prepare_run_dir(path: str | Path) -> Path:
    """Create the run directory (and its sub-folders) and prove it is writable, so a permission
    problem surfaces before hours of training rather than at the first checkpoint."""
    return writable_folder(path, "run directory", "--run-dir", ("checkpoints", "replay", "eval"))


def writable_folder(path: str | Path, what: str, option: str, subfolders: Sequence[str] = ()) -> Path:
    """Create `path` (and `subfolders`) and write a probe file there, so an unwritable output
    folder is a ConfigError naming `option` before any work, not a traceback after it."""
    folder = Path(path)
    try:
        for sub in ("", *subfolders):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise _not_writable(folder, what, option, error) from error
    return folder


def check_writable(path: str | Path, what: str, option: str) -> None:
    """Whether `path` is a folder this process can write in, or could create, without creating it:
    the nearest existing folder above it (or itself) must take a file, probed with a temporary file
    that is removed at once. For checks that must leave nothing behind (`cclnb study`'s pre-flight)."""
    folder = Path(path)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        handle, probe = tempfile.mkstemp(prefix=".write_test.", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise _not_writable(folder, what, option, error) from error


def _not_writable(folder: Path, what: str, option: str, error: OSError) -> ConfigError:
    return ConfigError(f"{what} {folder} is not writable ({error.strerror}); choose another one with {option}")


# What makes a result: a change anywhere else (README, docs, reports) leaves a result's code as committed.
CODE_PATHS = (":/cclnb", ":/notebooks", ":/benchmarks", ":/pyproject.toml")


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the cclnb checkout (None outside git), with "+dirty" when tracked code files
    (CODE_PATHS) differ from it: ties a result to the code that made it, and says when that code
    was not committed."""
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                                 cwd=where, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("+dirty" if changed else "")) or None


def short_commit(commit: str | None, length: int = 10) -> str:
    """`git_commit`'s value shortened for a table, keeping its "+dirty" mark ("?" when unknown)."""
    if not commit:
        return "?"
    head, dirty, _ = commit.partition("+dirty")
    return head[:length] + dirty


def _version(distribution: str) -> str | None:
    """An installed package's version from its metadata: importing scikit-learn only to read
    `__version__` cost every run 2.3 s of imports."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Package versions and hardware: numbers from different machines are not comparable."""
    import torch
    import torchvision

    from cclnb.training.precision import cpu_bf16_arithmetic, cpu_model
    import cclnb

    hardware: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                "cpu_model": cpu_model(), "cpu_bf16": cpu_bf16_arithmetic(),
                                "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        hardware["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    versions = {"python": platform.python_version(), "cclnb": cclnb.__version__,
                "torch": torch.__version__, "torchvision": torchvision.__version__,
                "numpy": np.__version__, "sklearn": _version("scikit-learn")}
    return {"versions": versions, "hardware": hardware}


def write_config(run_dir: Path, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """config.json: the resolved config plus git commit, versions, hardware and start time."""
    payload = dict(config)
    payload["git_commit"] = git_commit()
    payload.update(environment_info())
    payload["started"] = _dt.datetime.now().isoformat(timespec="seconds")
    if extra:
        payload.update(extra)
    write_json(run_dir / "config.json", payload)


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no config.json, so it is not a cclnb run directory; "
                              f"pass a run directory written by `cclnb train` or a checkpoint file")
    return read_json(path)


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    """status.json: what the run is doing now, so a notebook or `cclnb study` can tell a finished
    run from one to resume without opening a checkpoint."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    payload = {"state": state, **fields,
               "updated": _dt.datetime.now().isoformat(timespec="seconds")}
    write_json(Path(run_dir) / "status.json", payload)


def read_status(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "status.json"
    return read_json(path) if path.is_file() else None


def write_replay(run_dir: Path, task: int, ids: np.ndarray, selection: str) -> None:
    write_json(Path(run_dir) / "replay" / f"task_{task}.json",
               {"task": task, "ids": [int(i) for i in ids], "selection": selection})


def read_replay(run_dir: Path, task: int) -> np.ndarray:
    payload = read_json(Path(run_dir) / "replay" / f"task_{task}.json")
    return np.asarray(payload["ids"], dtype=np.int64)


def checkpoint_path(run_dir: Path, task: int | None = None) -> Path:
    """checkpoints/task_<t>.pt for a finished task, checkpoints/last.pt for the newest state."""
    name = "last.pt" if task is None else f"task_{task}.pt"
    return Path(run_dir) / "checkpoints" / name


def resolve_resume(resume: str | Path) -> tuple[Path, Path]:
    """Map `--resume` (a run directory or a checkpoint inside one) to (run dir, checkpoint)."""
    path = Path(resume)
    if path.is_dir():
        ckpt = checkpoint_path(path)
        if not ckpt.is_file():
            raise CheckpointError(f"{path} holds no checkpoints/last.pt: the run never finished an "
                                  f"epoch, so start it again without --resume")
        return path, ckpt
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    raise CheckpointError(f"--resume {resume}: no such run directory or checkpoint file")


class TrainLog:
    """train_log.csv (one row per `print_freq` steps and per epoch end) and train.log (text).

    Rows are appended and flushed at once so a killed run keeps its history; on resume the rows
    of the steps after the checkpoint (work the kill lost, which the resume redoes) are dropped
    first and the file is then appended to, so the log reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, columns: Sequence[str] = log_columns(),
                 tensorboard: bool = False) -> None:
        self.enabled = enabled
        # the same rows as TensorBoard scalars (`cclnb.training.events`; imports tensorboard only if asked)
        self.events = EventWriter(run_dir) if enabled and tensorboard else None
        self.csv_path = Path(run_dir) / "train_log.csv"
        self.text_path = Path(run_dir) / "train.log"
        self.columns = tuple(columns)
        if enabled and self.csv_path.exists():
            # a resumed run keeps the header it started with (a run of an older cclnb included)
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                self.columns = tuple(next(csv.reader(handle), self.columns))
        elif enabled:
            with open(self.csv_path, "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerow(self.columns)

    def discard_after(self, global_step: int) -> None:
        """Drop the rows logged after `global_step` (a resume redoes those steps)."""
        if not self.enabled or not self.csv_path.is_file():
            return
        with open(self.csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        kept = [r for r in rows if r.get("global_step") and int(r["global_step"]) <= global_step]
        if self.events is not None:
            self.events.purge_after(global_step)
        if len(kept) == len(rows):
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(kept)
        _atomic_write_text(self.csv_path, text.getvalue())

    def row(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.csv_path, "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow([_fmt(values.get(c)) for c in self.columns])
        if self.events is not None:
            self.events.scalars("train", {c: values.get(c) for c in self.columns if c != "global_step"},
                                values["global_step"])

    def line(self, message: str) -> None:
        if not self.enabled:
            return
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with open(self.text_path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {message}\n")


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def accuracy_path(run_dir: Path, protocol: str, who: str) -> Path:
    return Path(run_dir) / "eval" / f"acc_{protocol}_{who}.csv"


def write_accuracy_row(run_dir: Path, protocol: str, who: str, after_task: int,
                       per_task: Sequence[float], overall: float) -> None:
    """Add (or replace, after a resume) the row "after task i" of an accuracy matrix CSV.

    Rows are keyed by `after_task` so re-evaluating a task after a resume never duplicates a row.
    """
    path = accuracy_path(run_dir, protocol, who)
    header = ["after_task", *[f"task_{j}" for j in range(len(per_task))], "all"]
    rows: dict[int, list[str]] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            next(reader, None)
            rows = {int(r[0]): r for r in reader if r}
    rows[after_task] = [str(after_task), *[f"{a:.4f}" for a in per_task], f"{overall:.4f}"]
    _atomic_write_text(path, _csv_text(header, (rows[k] for k in sorted(rows))))


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = [",".join(header)] + [",".join(r) for r in rows]
    return "\n".join(lines) + "\n"
