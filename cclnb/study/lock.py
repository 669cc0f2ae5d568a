"""One `cclnb study` per study at a time: a lock in `runs/<study>/study.lock`.

Why: two identical commands started 2 s apart both ran. The second was caught only by a trainer's
own checkpoint check (exit 6, advising `--resume` while the first still ran); the baselines ran
twice in one folder and one executed notebook overwrote the other's.

How: the command holds a kernel lock (flock) on the file while it runs; the kernel releases it
however the process ends, SIGKILL included. The file also names its holder (PID, host, start,
command), so a second command refuses at once saying who runs the study (`StudyBusy`). A holder
that ends normally empties the file. A file that still names a process when nobody holds the lock
was left by a study that died: on this host it is taken over with a message; from another host it
is refused, since some shared file systems do not pass kernel locks between hosts and that study
may still run (the message says which file to delete once it is known to have ended). Where the
file system has no flock at all, the named process decides alone (alive on this host: refused).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from cclnb.errors import StudyBusy

LOCK_FILE = "study.lock"


@contextlib.contextmanager
def study_lock(runs_dir: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of the study whose runs are in `runs_dir` (created if needed) while within;
    `StudyBusy` if another command holds it."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _take(fd, path, log)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)      # released: an empty file names no holder
    finally:
        os.close(fd)                 # releases the kernel lock


def _take(fd: int, path: Path, log: Callable[[str], None]) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = True
    except BlockingIOError:
        raise StudyBusy(_busy(path, _holder(fd))) from None
    except OSError:                  # no flock on this file system: the named holder decides alone
        locked = False
    previous = _holder(fd)
    if previous:
        here = previous.get("host") == socket.gethostname()
        if not here or (not locked and _alive(previous.get("pid"))):
            raise StudyBusy(_busy(path, previous, here))
        log(f"took over the lock {path} of PID {previous.get('pid')} on host {previous.get('host')} "
            f"(started {previous.get('started')}), which ended without releasing it")
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(mine).encode(), 0)


def _holder(fd: int) -> dict[str, Any]:
    """Who the lock file names ({} when empty or unreadable)."""
    text = os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace").strip()
    try:
        holder = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:          # someone else's process
        return True
    return True


def _busy(path: Path, holder: dict[str, Any], here: bool = True) -> str:
    study = path.parent.name
    if not holder:                   # its holder has the lock but has not named itself yet
        return f"study '{study}' is running: another command holds {path} (it is starting); nothing was run"
    who = (f"study '{study}' is running: PID {holder.get('pid')} on host {holder.get('host')} "
           f"(started {holder.get('started')}: {holder.get('command')}) holds {path}")
    if here:
        return f"{who}; wait for it to end, or stop it first (cclnb study ... --status shows where it stands); nothing was run"
    return (f"{who}; if it no longer runs there, delete {path} and run this command again "
            f"(a lock from another host is never taken over); nothing was run")
