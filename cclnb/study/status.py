"""Where a study stands: every (method, seed)'s state, position and time left, read from its files.

`cclnb study ... --status` and the live lines of a running study (`cclnb.study.console`) read what
a study leaves anyway: `runs/<study>/<method>/seed<k>/` (status.json, train_log.csv, train.log,
config.json, replay/task_0.json, the executed notebooks and step logs) and the records in
`reports/<study>/runs/`. Nothing here writes, so it answers while a study runs in another
terminal, after it was killed, and on a copy of its folders.

The time left of a run is measured, not guessed from the config. While it trains: the time a
finished run of the same method took from the same global step to its end (scaled by how fast this
one has gone so far), else its own seconds per step since the previous task began (CCL's costlier
steps from its second task on, and the per-task evaluation, are in that window) times the steps
left. Steps left come from the task sizes the trainer logs when a task starts ("task t: N images +
R replayed") and, for tasks not yet started, from the replay budget a replay method keeps per
task. A (method, seed) not yet started takes what a finished one of the method took, else what a
running one is projected to take, else the other methods' times scaled by their `step_cost`
(`expected_cost`). The study's end replays the scheduler: runs in progress
hold their slots, the others start longest first (`cclnb.study.plan.expected_cost`) as
`cclnb.study.run` starts them, with `--jobs` slots; then the report. The arithmetic is in pure
functions (`entries_per_task`, `total_steps`, `cumulative_profile`, `training_left_s`, `makespan`)
so that it is tested on numbers, not on timing.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cclnb.study.lock import LOCK_FILE
from cclnb.study.plan import Study, expected_cost
from cclnb.study.report import BASELINES

DONE, RUNNING, QUEUED, FAILED, PREEMPTED = "done", "running", "queued", "failed", "preempted"
STATES = (DONE, RUNNING, QUEUED, FAILED, PREEMPTED)
# Without a study lock to ask, a run whose files have not changed for this long is taken as stopped:
# a training run writes train_log.csv every `print_freq` steps and status.json at every task end.
STALE_S = 600.0
# The report's rendering, until the study has an earlier render to time (papermill's duration in
# runs/<study>/report.ipynb): the demo's took 59 s on this project's 2 shared CPU cores (2026-12-07).
REPORT_S = 60.0
# A cluster job in one of these scheduler states is working on its (method, seed) now.
ACTIVE_JOB_STATES = ("RUNNING", "COMPLETING", "CONFIGURING")
WAITING_JOB_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED")
_STOPPED = ("Interrupted", "KeyboardInterrupt")     # the last line of a step stopped by a signal
_TASK_LINE = re.compile(r"task (\d+): (\d+) images \+ (\d+) replayed")


# ----------------------------------------------------------------------------- pure arithmetic
def entries_per_task(known: Mapping[int, int], n_tasks: int, growth: int) -> list[int] | None:
    """Entries (images + replayed images) of every task's epoch: the known ones (logged when a task
    starts), and after the last known task `growth` more per task (a replay method keeps that many
    ids of every finished task and trains on all of them later). None before any task is known."""
    if not known:
        return None
    last = max(known)
    return [known[t] if t in known else known[last] + (t - last) * growth if t > last
            else known[min(known)] for t in range(n_tasks)]


def total_steps(entries: Sequence[int], batch_size: int, epochs: int) -> int:
    """Steps of the whole run: `epochs` epochs of `entries // batch_size` steps per task (the
    loader drops the last partial batch, `cclnb.data.batches.steps_per_epoch`)."""
    return sum(epochs * (n // batch_size) for n in entries)


def cumulative_profile(rows: Iterable[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """(global_step, training seconds since the run began, task) from train_log.csv's
    (global_step, time_s, task). `time_s` restarts at each resume: a drop starts a segment whose
    times are added to the end of the previous one, so the profile counts only time spent training."""
    profile: list[tuple[int, float, int]] = []
    offset = last = 0.0
    for step, seconds, task in rows:
        if seconds < last:
            offset += last
        last = seconds
        profile.append((int(step), offset + seconds, int(task)))
    return profile


def interpolate(profile: Sequence[tuple[int, float, int]], step: float) -> float:
    """The profile's training seconds at `step` (linear between rows; 0 before the first row is
    taken from the origin; the last value after the end)."""
    before = (0, 0.0)
    for point in profile:
        if point[0] >= step:
            span = point[0] - before[0]
            return before[1] + (point[1] - before[1]) * ((step - before[0]) / span if span else 1.0)
        before = (point[0], point[1])
    return before[1]


def recent_rate(profile: Sequence[tuple[int, float, int]]) -> float | None:
    """Seconds per step since the previous task began (the whole run while in its first task): the
    newest cost per step, one task boundary's evaluation included. None without two rows."""
    if not profile:
        return None
    step, seconds, task = profile[-1]
    start = next(((s, t) for s, t, k in profile if k >= task - 1), (0, 0.0)) if task > 0 else (0, 0.0)
    return (seconds - start[1]) / (step - start[0]) if step > start[0] else None


def training_left_s(profile: Sequence[tuple[int, float, int]], steps: int | None,
                    reference: Sequence[tuple[int, float, int]] | None = None) -> float | None:
    """Training seconds left of a run at the end of `profile`, which has `steps` steps in all.

    With the `reference` profile of a finished run of the same method (same steps), what that run
    took from here to its end, times this run's pace relative to it so far; else the steps left at
    `recent_rate`. None when neither is known yet."""
    if not profile:
        return None
    step, seconds, _ = profile[-1]
    if reference:
        ref_here, ref_end = interpolate(reference, step), reference[-1][1]
        pace = seconds / ref_here if ref_here > 0 and seconds > 0 else 1.0
        return max(0.0, ref_end - ref_here) * pace
    rate = recent_rate(profile)
    if rate is None or steps is None:
        return None
    return max(0, steps - step) * rate


def makespan(running_left: Sequence[float], queued: Sequence[float], jobs: int) -> float:
    """When the last of these ends: `running_left` hold slots now, `queued` start in the given order
    on the first slot to free up, `jobs` slots in all (`cclnb.study.run`'s scheduler)."""
    slots = sorted([*running_left, *[0.0] * max(0, jobs - len(running_left))])
    for duration in queued:
        start = slots.pop(0)
        slots.append(start + duration)
        slots.sort()
    return max(slots, default=0.0)


# ----------------------------------------------------------------------------- reading a run
@dataclass(frozen=True)
class JobInfo:
    """A (method, seed)'s cluster job (`cclnb.launch.watch.job_states` fills it)."""

    launcher: str      # slurm | submitit-local
    job_id: str
    state: str         # the scheduler's word: PENDING, RUNNING, COMPLETED, FAILED, ...
    log: str


@dataclass(frozen=True)
class Liveness:
    """Whether the study's own process runs and since when (seconds since the epoch): a run whose
    files changed after that is one it runs, an older one a leftover that it resumes in turn. The
    running study's console knows (alive since it started); `--status` in another terminal asks
    the study's lock (`study_liveness`); where nobody can tell (alive None: a study started by a
    cclnb without the lock, or whose lock names another host) a run's file ages decide (`STALE_S`)."""

    alive: bool | None = None
    since: float | None = None
    holder: str = ""       # "PID 123 on host" when known


@dataclass
class RunFiles:
    """What a run directory says, read once (every field None/empty when absent)."""

    path: Path
    config: dict[str, Any] | None
    status: dict[str, Any] | None
    rows: list[dict[str, str]]
    known_entries: dict[int, int]      # task -> images + replayed images, logged when it started
    replay_budget: int | None          # ids a replay method keeps per task (replay/task_0.json)
    launched: float | None             # when its current notebook started
    newest: float | None               # mtime of its newest file
    status_mtime: float | None
    resumed: bool

    @functools.cached_property
    def profile(self) -> list[tuple[int, float, int]]:
        """(global_step, training seconds, task) per log row (`cumulative_profile`)."""
        return cumulative_profile((int(r["global_step"]), float(r["time_s"]), int(r["task"]))
                                  for r in self.rows if r.get("global_step") and r.get("time_s"))

    @property
    def earlier_s(self) -> float:
        """Training seconds logged before the current segment (a resumed run's earlier starts)."""
        return self.profile[-1][1] - float(self.rows[-1]["time_s"]) if self.profile else 0.0

    @property
    def n_tasks(self) -> int | None:
        value = (self.status or {}).get("n_tasks")
        if value is None and self.config:
            value = self.config.get("train_tasks") or self.config.get("n_tasks")
        return None if value is None else int(value)

    def steps(self, growth_hint: int | None = None) -> int | None:
        """Steps of the whole run (None until its first task has started)."""
        if not self.config or self.n_tasks is None:
            return None
        growth = self.replay_budget if self.replay_budget is not None else growth_hint
        entries = entries_per_task(self.known_entries, self.n_tasks, growth or 0)
        return None if entries is None else total_steps(entries, int(self.config["batch_size"]),
                                                        int(self.config["epochs"]))


def study_liveness(runs_dir: Path) -> Liveness:
    """Whether a `cclnb study` holds the study's lock (`runs/<study>/study.lock`, `cclnb.study.lock`)
    now, from the holder it names: its PID alive on this host. Reads only: taking the kernel lock,
    even for a moment, could make a study starting at that moment refuse to run."""
    try:
        text = (Path(runs_dir) / LOCK_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return Liveness()                     # no lock file: a study of a cclnb before the lock, or none yet
    try:
        holder = json.loads(text) if text else {}
    except ValueError:
        holder = {}
    if not isinstance(holder, dict) or not holder:
        return Liveness(False)                # released: its holder ended normally
    try:
        since = _dt.datetime.fromisoformat(str(holder.get("started"))).timestamp()
    except ValueError:
        since = None
    who = f"PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
    if holder.get("host") != socket.gethostname():
        return Liveness(None, since, who)     # another host's process: file ages decide
    try:
        os.kill(int(holder.get("pid")), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return Liveness(False, since, who)
    except PermissionError:                   # someone else's process, alive
        pass
    return Liveness(True, since, who)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None          # absent, or being replaced at this moment: the next look sees it


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _papermill_start(notebook: Path) -> float | None:
    """When papermill began executing `notebook` (its metadata; the executed copy is written at
    the start), as seconds since the epoch."""
    start = ((_json(notebook) or {}).get("metadata", {}).get("papermill") or {}).get("start_time")
    try:
        return _dt.datetime.fromisoformat(start).timestamp() if start else None
    except ValueError:
        return None


def read_run(run_dir: Path) -> RunFiles:
    """The files of one run directory (which may not exist yet)."""
    run_dir = Path(run_dir)
    rows: list[dict[str, str]] = []
    try:
        with open(run_dir / "train_log.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        pass
    known: dict[int, int] = {}
    resumed = False
    try:
        for line in (run_dir / "train.log").read_text(encoding="utf-8", errors="replace").splitlines():
            match = _TASK_LINE.search(line)
            if match:
                known[int(match[1])] = int(match[2]) + int(match[3])
            resumed = resumed or " resumed at task " in line
    except OSError:
        pass
    replay = _json(run_dir / "replay" / "task_0.json")
    budget = len(replay["ids"]) if replay and replay.get("selection", "none") != "none" else (0 if replay else None)
    config_path = run_dir / "config.json"
    launched = (_mtime(run_dir / "task_sequence.parameters.json") or _papermill_start(run_dir / "task_sequence.ipynb")
                or _mtime(config_path))
    try:
        newest = max((entry.stat().st_mtime for entry in os.scandir(run_dir) if entry.is_file()), default=None)
    except OSError:
        newest = None
    return RunFiles(run_dir, _json(config_path), _json(run_dir / "status.json"), rows, known, budget,
                    launched, newest, _mtime(run_dir / "status.json"), resumed)


def _failure(run: RunFiles) -> tuple[str, Path] | None:
    """(the error's last line, the file to read) of a failed step of the run, if one failed: the
    training (status.json), else a step whose log holds a traceback newer than status.json (a
    notebook that failed before the trainer began, a linear evaluation, the record)."""
    if (run.status or {}).get("state") == "failed":
        log = next((p for p in (run.path / "task_sequence.log", run.path / "task_sequence.ipynb") if p.is_file()),
                   run.path / "train.log")
        return str(run.status.get("error") or "failed (no message)"), log
    after = run.status_mtime or 0.0
    for log in sorted(run.path.glob("*.log")):
        if log.name == "train.log" or (_mtime(log) or 0.0) < after:
            continue
        text = log.read_text(encoding="utf-8", errors="replace")
        if "Traceback (most recent call last)" in text or "PapermillExecutionError" in text:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            last = lines[-1] if lines else "failed"
            if not any(word in last for word in _STOPPED):   # a stopped step resumes: not a failure
                return last, log
    return None


# ----------------------------------------------------------------------------- one (method, seed)
@dataclass(frozen=True)
class Pair:
    """One (method, seed) of the plan: where its run and record go, its scheduling cost and how
    many linear evaluations follow its training (student, and the teacher where kept)."""

    method: str
    seed: int
    run_dir: Path
    record: Path
    cost: float
    encoders: int


def plan_pairs(study: Study) -> list[Pair]:
    """Every (method, seed) of the plan, in plan order."""
    groups: dict[str, list] = {}
    for step in study.steps:
        if step.group:
            groups.setdefault(step.group, []).append(step)
    return [Pair(str(steps[0].parameters["method"]), int(steps[0].parameters["seed"]),
                 Path(steps[0].parameters["run_dir"]), steps[-1].output, steps[0].cost,
                 max(1, sum(s.notebook == "linear_eval" for s in steps))) for steps in groups.values()]


@dataclass
class PairStatus:
    """One row of the status table."""

    method: str
    seed: int
    state: str                       # done | running | queued | failed | preempted
    phase: str = ""                  # starting | training | evaluating (while running or stopped)
    task: int | None = None          # 0-based, as the trainer counts
    n_tasks: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss_moco: float | None = None
    img_per_s: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None       # until its record is written (None: unknown; 0 when done)
    detail: str = ""                 # the record, or the failure's last line and its log
    job: JobInfo | None = None
    cost: float = 1.0                # `expected_cost`: the scheduler's order


@dataclass
class _Measured:
    """What the study's finished runs of one method took."""

    durations: list[float] = field(default_factory=list)    # notebook start -> record, per pair
    profiles: list[list[tuple[int, float, int]]] = field(default_factory=list)
    post_per_encoder: list[float] = field(default_factory=list)   # training end -> record


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _measure(finished: Sequence[tuple[Pair, RunFiles]]) -> dict[str, _Measured]:
    measured: dict[str, _Measured] = {}
    for pair, run in finished:
        end = _mtime(pair.record)
        if end is None or run.resumed:     # a resumed run's wall time holds its pause
            continue
        m = measured.setdefault(pair.method, _Measured())
        if run.launched is not None:
            m.durations.append(max(0.0, end - run.launched))
        if run.profile:
            m.profiles.append(run.profile)
        if run.status_mtime is not None and run.profile:
            m.post_per_encoder.append(max(0.0, end - run.status_mtime) / pair.encoders)
    return measured


def _position(run: RunFiles) -> tuple[int | None, int | None, float | None, float | None]:
    """(task, epoch, last MoCo loss, img/s) from the newest log row, else status.json."""
    if run.rows:
        row = run.rows[-1]
        loss = float(row["loss_moco"]) if row.get("loss_moco") else None
        # an epoch's closing row measures the steps after the last `print_freq` row: none, 0 img/s
        speeds = [float(r["img_per_s"]) for r in run.rows[-3:] if r.get("img_per_s") and float(r["img_per_s"]) > 0]
        return int(row["task"]), int(row["epoch"]), loss, speeds[-1] if speeds else None
    status = run.status or {}
    return status.get("task"), status.get("epoch"), None, None


def _active(run: RunFiles, liveness: Liveness, now: float, job: JobInfo | None) -> bool:
    """Whether someone works on this run now: its job runs; else the study runs and the run's
    files changed since the study started; else (nobody to ask) its files changed lately."""
    if job is not None:
        return job.state.split()[0].upper() in ACTIVE_JOB_STATES if job.state else False
    if liveness.alive is False or run.newest is None:
        return False
    if liveness.alive and liveness.since is not None:
        return run.newest >= liveness.since
    return now - run.newest < STALE_S


class _Estimates:
    """The times the study's finished (method, seed)s measured, to estimate the others'."""

    def __init__(self, measured: Mapping[str, _Measured], growth_hint: int | None) -> None:
        self.measured, self.growth_hint = measured, growth_hint

    def post(self, pair: Pair) -> float:
        """Linear evaluations + record after the training: the method's measure per encoder, else
        every method's (an evaluation costs the same whichever method trained the encoder)."""
        own = _mean(self.measured.get(pair.method, _Measured()).post_per_encoder)
        every = _mean([v for m in self.measured.values() for v in m.post_per_encoder])
        return (own if own is not None else every or 0.0) * pair.encoders

    def reference(self, method: str) -> list[tuple[int, float, int]] | None:
        profiles = self.measured.get(method, _Measured()).profiles
        return profiles[-1] if profiles else None

    def whole(self, pair: Pair, rows: Sequence[PairStatus] = ()) -> float | None:
        """A (method, seed) from its start: what finished ones of its method took; else a running
        one's elapsed + time left; else what the other methods took (or, running, are projected to
        take) scaled by the methods' costs. An untrained baseline only evaluates: the baselines'
        measured time, else its evaluations at what the trained encoders' took. None: nothing yet."""
        durations = {m: _mean(v.durations) for m, v in self.measured.items() if v.durations}
        projected: dict[str, list[float]] = {}
        for r in rows:
            if r.state == RUNNING and r.elapsed_s is not None and r.eta_s is not None:
                projected.setdefault(r.method, []).append(r.elapsed_s + r.eta_s)
        for other, values in projected.items():
            durations.setdefault(other, _mean(values))
        if pair.method in durations:
            return durations[pair.method]
        if pair.method in BASELINES:
            measured = [d for other, d in durations.items() if other in BASELINES]
            if measured:
                return _mean(measured)
            return self.post(pair) if any(m.post_per_encoder for m in self.measured.values()) else None
        return _mean([d * expected_cost(pair.method) / expected_cost(other) for other, d in durations.items()
                      if other not in BASELINES and expected_cost(other) > 0])


# ----------------------------------------------------------------------------- the study
@dataclass
class StudyStatus:
    name: str
    rows: list[PairStatus]
    jobs: int
    eta_s: float | None              # until the report is rendered (None: unknown or a cluster's)
    report_s: float                  # the report's rendering, in eta_s
    liveness: Liveness
    notes: list[str] = field(default_factory=list)


def study_status(study: Study, jobs: Mapping[str, JobInfo] | None = None, liveness: Liveness = Liveness(),
                 now: float | None = None) -> StudyStatus:
    """Every (method, seed) of `study` with its state and time left, and the study's end at
    `study.jobs` slots (none for a cluster study: its scheduler decides). `jobs`: cluster jobs by
    record stem ("CCL-seed0")."""
    now = time.time() if now is None else now
    jobs = jobs or {}
    pairs = [(pair, read_run(pair.run_dir)) for pair in plan_pairs(study)]
    budgets = [run.replay_budget for _, run in pairs if run.replay_budget]
    estimates = _Estimates(_measure([(p, run) for p, run in pairs if p.record.is_file()]),
                           max(budgets) if budgets else None)
    rows = [pair_status(pair, run, jobs.get(pair.record.stem), liveness, now, estimates) for pair, run in pairs]
    for (pair, _), row in zip(pairs, rows):   # not started: what others took (running ones' projections known now)
        if row.state == QUEUED and row.eta_s is None:
            row.eta_s = estimates.whole(pair, rows)
    running = [row.eta_s for row in rows if row.state == RUNNING]
    waiting = sorted((row for row in rows if row.state in (QUEUED, PREEMPTED)), key=lambda r: -r.cost)
    timed = _papermill_duration(study.steps[-1].output)
    report_s = REPORT_S if timed is None else timed
    notes: list[str] = []
    eta = None
    if jobs:
        notes.append("cluster study: each (method, seed) is a job and its scheduler decides when the "
                     "queued ones start, so no total is given")
    elif any(r.eta_s is None for r in rows if r.state in (RUNNING, QUEUED, PREEMPTED)):
        unknown = dict.fromkeys(r.method for r in rows if r.state in (RUNNING, QUEUED, PREEMPTED) and r.eta_s is None)
        notes.append(f"no total yet: nothing measured to estimate {', '.join(unknown)} from (the first "
                     f"(method, seed) to finish its evaluations gives it)")
    elif running or waiting or not study.html.is_file():
        if running or waiting:
            eta = makespan(running, [r.eta_s for r in waiting], study.jobs) + report_s
        else:        # every (method, seed) is done: the report renders now, or on the next call
            last = max((_mtime(pair.record) or 0.0 for pair, _ in pairs), default=now)
            eta = report_s if liveness.alive is False else max(0.0, report_s - (now - last))
        if timed is None:
            notes.append(f"the report's rendering is counted as {duration(REPORT_S)}, what the demo's took on 2 "
                         f"CPU cores: this study has no earlier render to time")
    if any(row.state == FAILED for row in rows):
        notes.append("failed (method, seed)s are not counted: the study stops with their error once the "
                     "others end, and its next call runs them again")
    return StudyStatus(study.name, rows, study.jobs, eta, report_s, liveness, notes)


def pair_status(pair: Pair, run: RunFiles, job: JobInfo | None, liveness: Liveness, now: float,
                estimates: _Estimates) -> PairStatus:
    """The state, position and time left of one (method, seed)."""
    task, epoch, loss, speed = _position(run)
    row = PairStatus(pair.method, pair.seed, QUEUED, task=task, n_tasks=run.n_tasks, epoch=epoch,
                     epochs=(run.config or {}).get("epochs"), loss_moco=loss, img_per_s=speed, job=job,
                     cost=pair.cost)
    profile = run.profile
    trained_s = profile[-1][1] if profile else None
    if pair.record.is_file():
        end = _mtime(pair.record)
        row.state, row.eta_s, row.detail = DONE, 0.0, str(pair.record)
        row.elapsed_s = end - run.launched if end and run.launched and not run.resumed else trained_s
        return row
    if job is not None:
        row.detail = f"job {job.job_id} {job.state} (log {job.log})"
    failure = _failure(run) if run.newest is not None else None
    if failure is not None:
        row.state, row.detail = FAILED, f"{failure[0]} (log {failure[1]})"
        return row
    state = (run.status or {}).get("state")
    if state is None and not profile and not _active(run, liveness, now, job):
        return row          # not started (or stopped before its trainer began): starts afresh
    row.phase = "evaluating" if state == "complete" else "training" if profile else "starting"
    active = _active(run, liveness, now, job)
    post = estimates.post(pair)
    if state == "complete":
        since = now - run.status_mtime if active and run.status_mtime else 0.0
        row.eta_s = max(0.0, post - since)
    elif profile:
        left = training_left_s(profile, run.steps(estimates.growth_hint), estimates.reference(pair.method))
        row.eta_s = None if left is None else left + post
    else:                    # its notebook is starting: a whole run, less what has passed
        whole = estimates.whole(pair)
        row.eta_s = None if whole is None else max(0.0, whole - (now - (run.launched or now)))
    log = next((p for p in (run.path / "task_sequence.log", run.path / "train.log") if p.is_file()), run.path)
    if active:
        row.state = RUNNING
        row.elapsed_s = now - run.launched + run.earlier_s if run.launched is not None else trained_s
        row.detail = row.detail or f"log {log}"
    else:
        row.state = QUEUED if job is not None and job.state.split()[0].upper() in WAITING_JOB_STATES else PREEMPTED
        where = f"at task {task} epoch {epoch}" if state != "complete" else "after its training, before its record"
        resumes = "the study resumes it when a slot frees" if liveness.alive else \
            "the next `cclnb study` call resumes it"
        row.detail = (f"{row.detail}; " if row.detail else "") + f"stopped {where}; {resumes} (log {log})"
        row.elapsed_s = trained_s
    return row


def _papermill_duration(notebook: Path) -> float | None:
    """How long an earlier execution of `notebook` took (papermill's metadata), if there was one."""
    value = ((_json(notebook) or {}).get("metadata", {}).get("papermill") or {}).get("duration")
    return float(value) if isinstance(value, (int, float)) else None


# ----------------------------------------------------------------------------- the table
def duration(seconds: float | None) -> str:
    """12 s, 4 min 05 s, 2 h 13 min, 1 d 3 h; "?" when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def counted(value: int | None, total: int | None) -> str:
    """A 0-based position shown counted from 1: task 0 of 5 reads 1/5."""
    if value is None:
        return "-"
    return f"{value + 1}/{total}" if total else str(value + 1)


def table(status: StudyStatus, now: float | None = None) -> str:
    """The status as text: one line per (method, seed), then the study's end."""
    now = time.time() if now is None else now
    header = ("method", "seed", "state", "task", "epoch", "loss_moco", "img/s", "elapsed", "ETA", "record / log")
    lines = []
    for r in status.rows:
        state = f"{r.state} ({r.phase})" if r.phase and r.state in (RUNNING, PREEMPTED) else r.state
        position = r.state != QUEUED or r.phase
        lines.append((r.method, str(r.seed), state, counted(r.task, r.n_tasks) if position else "-",
                      counted(r.epoch, r.epochs) if position else "-",
                      "-" if r.loss_moco is None else f"{r.loss_moco:.4f}",
                      "-" if r.img_per_s is None else f"{r.img_per_s:.0f}",
                      "-" if r.elapsed_s is None else duration(r.elapsed_s),
                      "-" if r.state in (DONE, FAILED) else duration(r.eta_s), r.detail or "-"))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header) - 1)]
    text = [f"study {status.name!r}: " + ", ".join(f"{sum(r.state == s for r in status.rows)} {s}"
                                                   for s in STATES if any(r.state == s for r in status.rows))]
    if status.liveness.holder:
        said = {True: "running", False: "ended without releasing the study's lock",
                None: "on another host, so not checked: the runs' file ages decide"}[status.liveness.alive]
        text.append(f"  held by {status.liveness.holder}: {said}")
    for row in [header, *lines]:
        text.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    if status.eta_s is not None:
        end = _dt.datetime.fromtimestamp(now + status.eta_s).strftime("%Y-%m-%d %H:%M")
        report = f", the report's {duration(status.report_s)} included"
        text.append(f"study ends in about {duration(status.eta_s)} (at {end}, --jobs {status.jobs}{report})")
    text += [f"note: {note}" for note in status.notes]
    return "\n".join(text)
