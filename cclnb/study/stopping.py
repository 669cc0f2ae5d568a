"""A study stopped by SIGINT (Ctrl-C) or SIGTERM: every step it started stops, saving what it can,
and the study says which steps were interrupted and how to go on.

Why: Ctrl-C once printed a raw KeyboardInterrupt traceback and exited 130, while the papermill
processes and their kernels, re-parented, kept training; the rerun the docs advise then resumed a
run while the orphan still trained in the same folder.

How: the study's notebooks run in sessions of their own (`run._launch` with `start_new_session`),
so a terminal's Ctrl-C reaches the study alone, and `StudyStop` (while the steps run) turns each
signal into a stop: it starts nothing more, forwards SIGTERM to every running notebook process,
which interrupts its kernel so that a training saves at its stop point
(`cclnb.study.papermill_step`), interrupts the kernel of a notebook run in this process
(`--jobs 1`), and lets the steps in this process (an untrained baseline, a probe, a record: seconds)
finish. The loops that run the steps wait for every notebook process to end; one that takes longer
than `GRACE_S` gets a second SIGTERM (its kernel is killed), and after `KILL_S` more it is killed.
A second signal skips the wait: the kernels are killed at once. Then `interrupted` lists the
stopped steps, each with where its training resumes, as `Interrupted` (exit 130).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from cclnb.errors import Interrupted
from cclnb.study import papermill_step
from cclnb.study.plan import Step, Study

GRACE_S = 60.0     # a stopped step saving for longer than this is stopped again (its kernel killed)
KILL_S = 10.0      # and this much later its process is killed


class StudyStop:
    """Within: SIGINT and SIGTERM stop the study's steps (see the module's docstring)."""

    def __init__(self) -> None:
        self.signal: int | None = None       # the first signal received
        self.count = 0                       # stops sent to the children so far
        self.first = 0.0                     # when the first signal came (time.monotonic)
        self.children: set[subprocess.Popen] = set()     # notebook processes running now
        self.interrupted: list[tuple[int, Step]] = []    # (step number, step) stopped by the signal
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StudyStop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:       # not the main thread: no signal reaches this study here
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal, self.first = signum, time.monotonic()
        self._forward()

    def _forward(self) -> None:
        """The next stop to every running notebook: the first interrupts its kernel, the second
        kills it."""
        self.count += 1
        for child in list(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        papermill_step.signal_kernels(signal.SIGINT if self.count == 1 else signal.SIGKILL)   # --jobs 1

    def escalate(self) -> None:
        """Called while waiting for the children: stop harder those that take too long."""
        if not self.requested:
            return
        waited = time.monotonic() - self.first
        if self.count == 1 and waited > GRACE_S:
            self._forward()
        elif waited > GRACE_S + KILL_S:
            for child in list(self.children):
                if child.poll() is None:
                    child.kill()

    def error(self, study: Study, total: int, log: Callable[[str], None]) -> Interrupted:
        """One line per interrupted step (with where its training resumes), then the error."""
        for index, step in sorted(self.interrupted, key=lambda item: item[0]):
            log(interrupted_line(step, index, total))
        name = signal.Signals(self.signal).name if self.signal else "a signal"
        count = len(self.interrupted)
        what = (f"{count} running step{'s were' if count != 1 else ' was'} interrupted (listed above)"
                if count else "no step was running")
        return Interrupted(f"study '{study.name}' stopped by {name}: {what}; everything finished is kept; "
                           f"run the same command again to continue")


def interrupted_line(step: Step, index: int, total: int) -> str:
    """`[3/13] CCL seed 0: task sequence: interrupted; ...` with where the step goes on."""
    from cclnb.training import runs

    head = f"[{index}/{total}] {step.label}: interrupted"
    if step.notebook == "task_sequence":
        run_dir = Path(step.parameters["run_dir"])
        last = runs.checkpoint_path(run_dir)
        try:
            status = runs.read_status(run_dir) or {}
        except (OSError, ValueError):
            status = {}
        if status.get("state") == "interrupted" and last.is_file():
            # counted from 1, as the study's console counts them (the trainer's own message counts from 0)
            where = (f"task {status.get('task', 0) + 1}/{status.get('n_tasks', '?')}, epoch {status.get('epoch', 0) + 1}, "
                     f"step {status.get('step')}")
            return f"{head}; its training saved its state at {where} in {last} and resumes there"
        if last.is_file():
            return f"{head}; it resumes from {last}"
    return f"{head}; it runs again from its start"
