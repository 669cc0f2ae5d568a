"""One notebook step executed by papermill, with the kernel arguments every study step gets.

Why not papermill's command line for the steps a study runs in their own processes: it cannot pass
arguments to the kernel, so ipykernel's start-up warning that its local TCP sockets are unencrypted
(noise to a study's user) landed in every step's log. `python -m cclnb.study.papermill_step
NOTEBOOK OUTPUT PARAMETERS.json` does what `papermill NOTEBOOK OUTPUT -f PARAMETERS.json -k python3
--log-output --no-progress-bar --cwd <output's folder>` did, with the kernel's log level at ERROR:
the same executed copy, the same cell-by-cell log, a non-zero exit status when a cell raises.
A step's process imports papermill and this module only (`cclnb.study` imports its modules on
first use): the rest of the study imports torch, seconds per step before its kernel even starts.

Stopping. jupyter_client starts each kernel in a session of its own, out of reach of the signals
sent to the process that started it: a study's Ctrl-C once left kernels training after their
papermill processes were gone. So every kernel started here is tracked (`signal_kernels`), and
a step run as its own process stops its kernel itself: the first SIGTERM or SIGINT interrupts it
(SIGINT to the kernel: a training saves at its stop point and stops, `StopFlag`; any other cell
raises KeyboardInterrupt), repeated every few seconds while the notebook runs, since a kernel
between two cells ignores SIGINT; a second kills it; and the step exits with 130. The same
happens when the study that started the step dies (a watchdog thread sees its parent change, as
after a SIGKILL). A step started with those signals ignored (a cluster job's, `cclnb.launch.job`)
keeps them ignored.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

# Arguments of every notebook's kernel. ipykernel warns at every start that its local TCP sockets
# are unencrypted, which tells a study's user nothing; its errors still show.
KERNEL_ARGUMENTS = ("--IPKernelApp.log_level=ERROR",)
PARENT_ENV = "CCLNB_STUDY_PID"   # the study that started this step: its death stops the step
INTERRUPTED = 130                # exit status of a step stopped by a signal (as `cclnb.errors.Interrupted`)
POLL_S = 1.0                     # how often the watchdog looks at the parent
REPEAT_S = 3.0                   # how often a pending interrupt is sent again

_KERNELS: list[Any] = []         # the kernel managers of this process (each kernel in its own session)


@functools.cache
def _tracked_kernel_manager() -> type:
    """nbclient's kernel manager, registering every instance in `_KERNELS` (built on first use:
    importing jupyter_client costs a study's process time it need not spend)."""
    from jupyter_client.manager import AsyncKernelManager

    class TrackedKernelManager(AsyncKernelManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _KERNELS.append(self)

    return TrackedKernelManager


def signal_kernels(sig: int) -> int:
    """Send `sig` to the process group of every running kernel this process started (the kernel
    and whatever it started, torchrun's workers included); returns how many got it."""
    reached = 0
    for manager in list(_KERNELS):
        provisioner = manager.provisioner
        process = getattr(provisioner, "process", None)
        if process is None or process.poll() is not None:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(getattr(provisioner, "pgid", None) or process.pid, sig)
            reached += 1
    return reached


def execute(notebook: Path, output: Path, parameters: Mapping[str, Any],
            stream: TextIO | None = None) -> None:
    """Execute `notebook` into `output` (run in `output`'s folder, which must exist) with the
    `python3` kernel; `stream`: where the cells' output goes as they run (None: papermill's logger,
    as its `--log-output`)."""
    import papermill

    papermill.execute_notebook(str(notebook), str(output), parameters=dict(parameters),
                               kernel_name="python3", progress_bar=False, log_output=True,
                               stdout_file=stream, stderr_file=stream, cwd=str(output.parent),
                               extra_arguments=list(KERNEL_ARGUMENTS),
                               kernel_manager_class=_tracked_kernel_manager())


class _Stop:
    """This step's stop: the first call interrupts the kernel, the next kills it."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0

    def __call__(self, signum: int | None = None, frame: Any = None) -> None:
        self.count += 1
        self.last = time.monotonic()
        signal_kernels(signal.SIGINT if self.count == 1 else signal.SIGKILL)


def _watch(stop: _Stop, parent: int, done: threading.Event) -> None:
    """Until `done`: stop when the study that started this step is gone (its children are
    re-parented), and send a pending interrupt again every REPEAT_S."""
    while not done.wait(POLL_S):
        if not stop.count and os.getppid() != parent:
            stop()
        elif stop.count == 1 and time.monotonic() - stop.last >= REPEAT_S:
            stop.last = time.monotonic()
            signal_kernels(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    notebook, output, parameters = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill's CLI does the same
    stop, done = _Stop(), threading.Event()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(sig) is not signal.SIG_IGN}    # ignored by a cluster job: stays ignored
    parent = int(os.environ.get(PARENT_ENV) or os.getppid())
    threading.Thread(target=_watch, args=(stop, parent, done), daemon=True).start()
    try:
        execute(Path(notebook), Path(output), json.loads(Path(parameters).read_text()))
    except Exception:
        if stop.count:       # the notebook stopped because it was asked to: its cell says where
            return INTERRUPTED
        raise
    finally:
        done.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
