"""The console of a running study with concurrent jobs: one updating line per running job.

With `--jobs N > 1` every notebook writes into its own log, so the study's terminal said only when
a step started and ended; a run of hours looked dead between. `LiveLines` adds, below those
lines, one line per running job (method, seed, task and epoch, MoCo loss, img/s, time left) and
the study's expected end, redrawn in place on a terminal. Where stdout is not a terminal (CI,
nohup, a pipe into a file) nothing is redrawn: a plain line is printed when a job reaches a new
epoch, so a log file grows by one line per epoch and job. The numbers are `cclnb.study.status`'s,
from the same files `cclnb study --status` reads.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Mapping, TextIO

from cclnb.study import status
from cclnb.study.plan import Step, Study

REFRESH_S = 2.0        # how often the run directories are read again


class LiveLines:
    """Permanent lines through `log`, the live block below them; a context manager that clears
    the block on exit. `show(running)` is called by the scheduler on every tick with the steps
    running now, by group ("CCL seed 0"); it reads the runs at most every `refresh_s`."""

    def __init__(self, study: Study, log: Callable[[str], None] = print, stream: TextIO | None = None,
                 tty: bool | None = None, refresh_s: float = REFRESH_S) -> None:
        self.study, self._log, self.stream = study, log, stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.refresh_s = refresh_s
        self.started = time.time()
        self._drawn = 0                      # lines of the live block on screen now
        self._lines: list[str] = []
        self._said: dict[str, tuple] = {}    # plain mode: the position last printed per group
        self._next = 0.0

    def __enter__(self) -> "LiveLines":
        return self

    def __exit__(self, *exc: object) -> None:
        self._clear()

    def log(self, message: str) -> None:
        """A permanent line (a step started or ended), above the live block."""
        self._clear()
        self._log(message)
        self._draw()

    def show(self, running: Mapping[str, Step]) -> None:
        now = time.time()
        if now < self._next:
            return
        self._next = now + self.refresh_s
        rows = self._rows(running, now)
        if self.tty:
            lines = [line for _, _, line in rows]
            if lines != self._lines or not self._drawn:     # redraw only what changed
                self._clear()
                self._lines = lines
                self._draw()
            return
        for group, position, line in rows:
            if group and self._said.get(group) != position:
                self._said[group] = position
                self._log(f"  {line}")

    # ------------------------------------------------------------------ internals
    def _rows(self, running: Mapping[str, Step], now: float) -> list[tuple[str, tuple, str]]:
        """(group, its position, line) per running job, then the study's end (group "")."""
        current = status.study_status(self.study, liveness=status.Liveness(True, self.started), now=now)
        by_run = {(r.method, r.seed): r for r in current.rows}
        rows = []
        for group, step in running.items():
            row = by_run.get((str(step.parameters.get("method")), int(step.parameters.get("seed", -1))))
            if row is not None:
                rows.append((group, (step.label, row.phase, row.task, row.epoch), job_line(group, step, row)))
        if current.eta_s is not None:
            rows.append(("", (), f"study: {sum(r.state == status.DONE for r in current.rows)}/{len(current.rows)} "
                             f"done, ends in about {status.duration(current.eta_s)}"))
        return rows

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")     # up to the block's first line, erase below
            self.stream.flush()
        self._drawn = 0

    def _draw(self) -> None:
        if self.tty and self._lines:
            self.stream.write("".join(f"{line}\n" for line in self._lines))
            self.stream.flush()
            self._drawn = len(self._lines)


def job_line(group: str, step: Step, row: status.PairStatus) -> str:
    """"CCL seed 0: task 3/5 epoch 2/4, loss_moco 3.912, 212 img/s, 1 min 20 s left"; a step after
    the training reads "CCL seed 0: linear eval (student), 25 s left"."""
    training = step.notebook == "task_sequence" and row.phase == "training" and row.task is not None
    if training:
        where = f"task {status.counted(row.task, row.n_tasks)} epoch {status.counted(row.epoch, row.epochs)}"
    elif step.notebook == "task_sequence":      # its kernel starting, or its training just ended
        where = "training done" if row.phase == "evaluating" else "starting"
    else:
        where = step.label.split(": ", 1)[-1]           # "linear eval (student)"
    parts = [f"{group}: {where}"]
    if training and row.loss_moco is not None:
        parts.append(f"loss_moco {row.loss_moco:.3f}")
    if training and row.img_per_s is not None:
        parts.append(f"{row.img_per_s:.0f} img/s")
    parts.append(f"{status.duration(row.eta_s)} left")
    return ", ".join(parts)
