"""Running a study's plan: papermill steps (several at once), failures named, the report rendered.

Every step's executed notebook is kept next to its run, so a result can always be traced to the
cells that produced it; a failed step names the notebook and the cell, leaving everything already
done in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from cclnb.errors import CclnbError
from cclnb.study import papermill_step
from cclnb.study.console import LiveLines
from cclnb.study.notebooks import notebook_path
from cclnb.study.plan import Step, Study
from cclnb.study.stopping import StudyStop

class StudyStepFailed(CclnbError):
    """Steps of the study raised; each `StepFailure` names the file that holds its traceback."""

    exit_code = 6

    def __init__(self, failures: Sequence[StepFailure], message: str) -> None:
        super().__init__(message)
        self.failures = list(failures)


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
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    step.output.parent.mkdir(parents=True, exist_ok=True)  # papermill does not create it
    try:
        papermill_step.execute(notebook_path(step.notebook, notebooks_dir), step.output, step.parameters,
                               sys.stdout)
    except PapermillExecutionError as error:
        raise _StepError(*_cell_detail(error.cell_index, error.exec_count, error.source,
                                       error.ename, error.evalue)) from error
    except DeadKernelError as error:
        raise _StepError("", f"the kernel died ({error}); out of memory?") from error


class _StepError(Exception):
    """Internal: a step failed in (cell, cause); `run_study` adds the step's number and label."""


def _launch(step: Step, notebooks_dir: str | Path | None, threads: int, **popen: Any) -> subprocess.Popen:
    """Start papermill for `step` as its own process, its output in `<output>.log`; the kernel
    gets `threads` CPU threads (OMP_NUM_THREADS; a value in this process' environment wins, which
    is how `pinned_threads` pins them) so that concurrent notebooks share the cores instead of
    oversubscribing them. `popen`: further `subprocess.Popen` arguments (a cluster job starts its
    notebooks deaf to the scheduler's signals, `cclnb.launch.job`)."""
    step.output.parent.mkdir(parents=True, exist_ok=True)
    params_file = step.output.with_suffix(".parameters.json")
    params_file.write_text(json.dumps(step.parameters, indent=1))
    command = [sys.executable, "-m", "cclnb.study.papermill_step",
               str(notebook_path(step.notebook, notebooks_dir)), str(step.output), str(params_file)]
    env = {"OMP_NUM_THREADS": str(threads), **os.environ, papermill_step.PARENT_ENV: str(os.getpid())}
    with open(step.output.with_suffix(".log"), "w", encoding="utf-8") as log:  # the child keeps its copy
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, **popen)


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Within: torch in this process, and any kernel started here, use `threads` CPU threads
    (None: nothing changes), whatever the caller's OMP_NUM_THREADS. A study runs inside it, so its
    in-process steps (untrained baselines, inline probes), its `--jobs 1` kernels and its
    concurrent notebooks all compute alike (`Preset.threads`)."""
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
                      log: Callable[[str], None], total: int,
                      show: Callable[[dict[str, Step]], None] = lambda running: None,
                      stop: StudyStop | None = None) -> list[StepFailure]:
    """Run the groups of `pending` (each group's steps in order, the costliest groups first) with
    up to `study.jobs` notebooks at once, each on `study.threads` threads, in a session of its own.
    A failed step drops the rest of its group; the other groups finish; returns the failures. Once
    `stop` is requested nothing more starts and the running notebooks are awaited, each one that
    ends then counted as interrupted, not failed."""
    stop = stop or StudyStop()
    queues: dict[str, list[tuple[int, Step]]] = {}
    for index, step in sorted(pending, key=lambda item: -item[1].cost):   # stable: groups keep their order
        queues.setdefault(step.group, []).append((index, step))
    jobs, threads = study.jobs, study.threads
    running: dict[str, tuple[int, Step, subprocess.Popen, float]] = {}
    failures: list[StepFailure] = []
    while queues or running:
        if stop.requested:
            queues.clear()
        for group in [g for g in queues if g not in running]:
            if len(running) >= jobs:   # in-process steps take a slot too: the CPU is shared
                break
            queue = queues[group]
            while queue and queue[0][1].action is not None:
                index, step = queue.pop(0)
                failure = _run_action(step, index, total, log)
                if failure is not None:
                    failures.append(failure)
                    queue.clear()
            if queue and len(running) < jobs:
                index, step = queue.pop(0)
                log(f"[{index}/{total}] {step.label} ... (log {step.output.with_suffix('.log')})")
                process = _launch(step, notebooks_dir, threads, start_new_session=True)
                stop.children.add(process)
                running[group] = (index, step, process, time.monotonic())
            if not queue:
                del queues[group]
        time.sleep(0.2)
        show({group: entry[1] for group, entry in running.items()})   # the live line of each running job
        stop.escalate()
        for group, (index, step, proc, tic) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[group]
            stop.children.discard(proc)
            if proc.returncode != 0 and stop.requested:
                stop.interrupted.append((index, step))
            elif proc.returncode == 0:
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


def _run_pending(pending: list[tuple[int, Step]], study: Study, notebooks_dir: str | Path | None,
                 log: Callable[[str], None], total: int, failures_log: Path, stop: StudyStop) -> None:
    """The pending steps: with `study.jobs` > 1 all but the report concurrently, then the rest
    (everything with `--jobs 1`) in order in this process, the first failure raised; once `stop`
    is requested, nothing more (the step it interrupted is in `stop.interrupted`)."""
    if study.jobs > 1:
        with LiveLines(study, log) as live:
            failures = _run_concurrently(pending[:-1], study, notebooks_dir, live.log, total, live.show, stop)
        if failures:
            raise _failed(failures, failures_log)
        pending = pending[-1:]
    for index, step in pending:
        if stop.requested:
            return
        if step.action is not None:
            failure = _run_action(step, index, total, log)
            if failure is not None:
                raise _failed([failure], failures_log)
            continue
        log(f"[{index}/{total}] {step.label} ...")
        tic = time.monotonic()
        try:
            execute_step(step, notebooks_dir)
        except _StepError as error:
            if stop.requested:
                stop.interrupted.append((index, step))
                return
            raise _failed([_notebook_failure(step, index, total, *error.args)],
                          failures_log) from error.__cause__
        log(f"[{index}/{total}] {step.label}: done in {time.monotonic() - tic:.0f} s")


def say_left_out(folders: Sequence[str | Path], log: Callable[[str], None]) -> None:
    """Each record the report leaves out of its averages, and why: said on its page, and here,
    since the page is not where a terminal user looks first."""
    from cclnb.study.records import study_results

    for refusal in study_results(folders).refused:
        log(f"left out of the averages (see the report): {refusal.key} ({refusal.group} seed {refusal.seed}): "
            f"{refusal.reason}")


def _make_way(study: Study, changed: dict[str, list[str]], log: Callable[[str], None]) -> None:
    """Once the pre-flight has passed: --force deletes the runs it names, --rerun-changed moves
    the changed ones and their records aside."""
    from cclnb.study.rerun import move_aside
    from cclnb.training.runs import timestamp

    for run_dir in study.forced:
        shutil.rmtree(run_dir)
    for aside in move_aside(study, changed, timestamp()):
        log(f"--rerun-changed: the old run and its record moved to {aside}")


def run_study(study: Study, notebooks_dir: str | Path | None = None,
              log: Callable[[str], None] = print) -> Path:
    """Execute the plan's pending steps and render the report; returns index.html.

    With `study.jobs` > 1, up to that many (method, seed) runs proceed at once, each notebook
    in its own papermill process (output in `<notebook>.log` beside its executed copy); else
    every step runs in this process, in order, its output streamed here. The report comes last.
    First finished runs are compared with what the command would run (`cclnb.study.rerun`: a
    difference is refused, or with --rerun-changed run afresh), then the pre-flight
    (`cclnb.study.preflight`) checks everything knowable before a step starts; only then, under the
    study's lock (`cclnb.study.lock`: a second command on a running study refuses), does --force
    delete the runs it names (--rerun-changed move its own aside). A failure raises StudyStepFailed naming the
    step and the file with its traceback (after the concurrent runs have finished; several failures
    are grouped by cause and listed in `runs/<study>/failures.log`). SIGINT (Ctrl-C) or SIGTERM
    stops every running step, a training where it can save (`cclnb.study.stopping`), and raises
    Interrupted naming them; the same command continues.
    """
    from cclnb.study.preflight import check_study
    from cclnb.study.lock import study_lock
    from cclnb.study.rerun import compared

    study, changed = compared(study)
    for note in check_study(study):
        log(note)
    with study_lock(study.runs_dir, log), StudyStop() as stop:   # one command per study; Ctrl-C stops it cleanly
        _make_way(study, changed, log)
        failures_log = study.runs_dir / "failures.log"
        total = len(study.steps)
        numbered = list(enumerate(study.steps, start=1))
        started = time.monotonic()
        for index, step in numbered:
            if step.done:
                log(f"[{index}/{total}] {step.label}: already complete, skipped ({step.output.parent})")
        pending = [(i, s) for i, s in numbered if not s.done]
        with pinned_threads(study.preset.threads):
            _run_pending(pending, study, notebooks_dir, log, total, failures_log, stop)
        if stop.requested:
            raise stop.error(study, total, log)
        html = render_html(study.steps[-1].output, study.html)
        say_left_out(study.steps[-1].parameters["records"], log)
        log(f"study {study.name!r} finished in {time.monotonic() - started:.0f} s; report: {html}")
        return html
