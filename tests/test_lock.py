"""One `cclnb study` per study at a time (`cclnb.study.lock`): a second command on a study that runs
refuses at once naming the PID and host that hold it; a lock its process left behind when it died
is taken over, with a message; a lock from another host is never taken over silently."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cclnb.errors import StudyBusy
from cclnb.study.lock import LOCK_FILE, study_lock


def test_a_running_study_refuses_a_second_command_naming_its_pid_and_host(tmp_path: Path) -> None:
    """Two identical commands started 2 s apart both ran: the baselines twice in one folder, one
    executed notebook over the other's. The lock is a kernel lock (flock), released whatever ends
    the process holding it."""
    lines: list[str] = []
    with study_lock(tmp_path / "demo", lines.append):
        holder = json.loads((tmp_path / "demo" / LOCK_FILE).read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(StudyBusy, match=rf"study 'demo' is running: PID {os.getpid()} on host "
                                            rf"{socket.gethostname()} \(started .*\) holds .*demo/{LOCK_FILE}"):
            with study_lock(tmp_path / "demo", lines.append):
                pytest.fail("two commands ran one study")
    assert lines == [] and (tmp_path / "demo" / LOCK_FILE).read_text() == ""   # released
    with study_lock(tmp_path / "demo", lines.append):
        pass
    assert lines == []


def test_a_lock_whose_process_died_is_taken_over_with_a_message(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                "started": "2026-12-07T10:00:00", "command": "cclnb study"}))
    lines: list[str] = []
    with study_lock(folder, lines.append):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(lines) == 1
    assert lines[0].startswith(f"took over the lock {folder / LOCK_FILE} of PID {pid} on host "
                               f"{socket.gethostname()} (started 2026-12-07T10:00:00), which ended without releasing it")


def test_a_lock_left_on_another_host_is_not_taken_over(tmp_path: Path) -> None:
    """No process of another host can be checked from here: its study may still run on a file
    system that does not share kernel locks between hosts."""
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 4242, "host": "gpu-node-7", "started": "2026-12-07T10:00:00",
                                                "command": "cclnb study --preset demo"}))
    with pytest.raises(StudyBusy, match=r"study 'demo' is running: PID 4242 on host gpu-node-7 .*; if it no longer "
                                        r"runs there, delete .*demo/study.lock and run this command again"):
        with study_lock(folder, lambda line: None):
            pytest.fail("another host's lock was taken over")
