"""Ctrl-C (SIGINT) or SIGTERM to `cclnb study` stops every process it started, lets each training save
where it stands, says which steps were interrupted and how to go on, and exits 130; a rerun of the
same command then finishes with records equal to an uninterrupted study's. A study that is
SIGKILLed leaves no process behind either: its notebooks notice and stop cleanly.

Before: Ctrl-C printed a raw KeyboardInterrupt traceback and exited 130 while the papermill
processes and their kernels, re-parented, kept training; the rerun the docs advise then resumed CCL
while the orphan still trained in the same run folder. After a SIGKILL four processes ran on.

The first test replaces the notebooks by sleeping processes (seconds); the others run tiny real
studies (marked slow).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

from cclnb import study
from cclnb.errors import Interrupted
from cclnb.study import run as study_run

# A notebook step that runs until SIGTERM, then exits as an interrupted papermill step does.
SLEEPER = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))\n"
           "time.sleep(120)\n")


def test_a_signal_stops_every_running_step_and_says_how_to_go_on(tmp_path: Path, monkeypatch) -> None:
    started: list[subprocess.Popen] = []
    sessions: list[bool] = []

    def launch(step: study.Step, notebooks_dir: object, threads: int, **popen: Any) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", SLEEPER], **popen)
        started.append(process)
        sessions.append(popen.get("start_new_session", False))
        if len(started) == 2:       # both jobs run: the user presses Ctrl-C
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        return process

    monkeypatch.setattr(study_run, "_launch", launch)
    plan = study.plan_study("demo", runs_root=tmp_path / "runs", reports_root=tmp_path / "reports",
                            methods=["Finetuning", "Joint", "CCL"], seeds=[0], baseline=False, jobs=2)
    lines: list[str] = []
    tic = time.monotonic()
    with pytest.raises(Interrupted) as info:
        study.run_study(plan, log=lines.append)
    assert time.monotonic() - tic < 60
    # each notebook runs in its own session, so a terminal's Ctrl-C reaches the study alone, which
    # stops them; none outlives the study
    assert sessions == [True, True] and [p.returncode for p in started] == [130, 130]
    assert [line for line in lines if "interrupted" in line] == [
        "[1/11] Finetuning seed 0: task sequence: interrupted; it runs again from its start",
        "[7/11] CCL seed 0: task sequence: interrupted; it runs again from its start"]
    message = str(info.value)
    assert message == ("study 'demo' stopped by SIGINT: 2 running steps were interrupted (listed above); "
                       "everything finished is kept; run the same command again to continue")
    assert info.value.exit_code == 130
    # the queued step (Joint) never started, and no report was rendered
    assert not (tmp_path / "runs" / "demo" / "Joint").exists() and not plan.html.exists()


def test_with_one_job_a_signal_interrupts_the_notebook_running_in_the_study(tmp_path: Path, monkeypatch) -> None:
    """`--jobs 1` runs each notebook in the study's own process, its kernel a child of the study:
    the signal reaches that kernel through `papermill_step.signal_kernels` (SIGINT: the training
    saves and stops; a second signal: SIGKILL)."""
    from cclnb.study import papermill_step

    sent: list[int] = []
    monkeypatch.setattr(papermill_step, "signal_kernels", lambda sig: sent.append(sig) or 1)

    def execute_step(step: study.Step, notebooks_dir: object = None) -> None:
        os.kill(os.getpid(), signal.SIGINT)       # Ctrl-C while the first notebook runs
        deadline = time.monotonic() + 30
        while not sent and time.monotonic() < deadline:
            time.sleep(0.05)
        raise study_run._StepError("cell 5 (In [3]: `run_dir = ...`)", "Interrupted: stopped by a signal")

    monkeypatch.setattr(study_run, "execute_step", execute_step)
    monkeypatch.setattr(study_run, "_run_action", lambda *a: pytest.fail("a step started after the signal"))
    plan = study.plan_study("demo", runs_root=tmp_path / "runs", reports_root=tmp_path / "reports",
                            methods=["Joint"], seeds=[0], baseline=False, jobs=1)
    lines: list[str] = []
    with pytest.raises(Interrupted, match=r"stopped by SIGINT: 1 running step was interrupted"):
        study.run_study(plan, log=lines.append)
    assert sent == [signal.SIGINT]
    assert lines[-1] == "[1/4] Joint seed 0: task sequence: interrupted; it runs again from its start"


def test_an_interrupted_step_says_where_it_goes_on(tmp_path: Path) -> None:
    from cclnb.study.stopping import interrupted_line

    run_dir = tmp_path / "CCL" / "seed0"
    step = study.Step("CCL seed 0: task sequence", "task_sequence", run_dir / "task_sequence.ipynb",
                      {"run_dir": str(run_dir)})
    assert interrupted_line(step, 7, 58) == "[7/58] CCL seed 0: task sequence: interrupted; it runs again from its start"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    (run_dir / "status.json").write_text(json.dumps({"state": "failed"}))      # stopped before it trained
    assert interrupted_line(step, 7, 58).endswith(f"interrupted; it resumes from {run_dir / 'checkpoints' / 'last.pt'}")
    (run_dir / "status.json").write_text(json.dumps({"state": "interrupted", "task": 1, "epoch": 0, "step": 3,
                                                     "n_tasks": 5}))
    assert interrupted_line(step, 7, 58) == (
        f"[7/58] CCL seed 0: task sequence: interrupted; its training saved its state at task 2/5, epoch 1, step 3 "
        f"in {run_dir / 'checkpoints' / 'last.pt'} and resumes there")


# ----------------------------------------------------------------------------- tiny real studies
# Two runs at once, each a few dozen steps: long enough to be stopped mid-training, seconds each.
TINY = ["subset_per_class=24", "n_tasks=2", "epochs=3", "batch_size=16", "bn_groups=2", "key_bn_groups=2",
        "moco_k=64", "ccl_k=16", "n_save=2", "knn_k=5", "progress=False", "linear_eval.subset_per_class=8",
        "linear_eval.progress=False"]
METHODS = ["CCL", "Finetuning"]


def _argv(root: Path) -> list[str]:
    return ["study", "--preset", "demo", *[x for p in TINY for x in ("-p", p)], "--methods", *METHODS,
            "--seeds", "0", "--no-baseline", "--jobs", "2", "--runs-root", str(root / "runs"),
            "--reports-root", str(root / "reports")]


def _start(root: Path) -> subprocess.Popen:
    """`cclnb study` as a terminal starts it: its own process group, which a Ctrl-C reaches."""
    return subprocess.Popen([sys.executable, "-m", "cclnb", *_argv(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _state(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "status.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None


def _when(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.1)


def _training_then(root: Path, process: subprocess.Popen, sig: int, to_group: bool) -> list[psutil.Process]:
    """Once both runs train: `sig` to the study (its process group: a terminal's Ctrl-C); returns
    every process the study had started."""
    runs = [root / "runs" / "demo" / m / "seed0" for m in METHODS]
    _when(lambda: all(_state(r) == "running" for r in runs) or process.poll() is not None, 300, "both runs to train")
    assert process.poll() is None, process.communicate()
    tree = psutil.Process(process.pid).children(recursive=True)
    assert len(tree) >= 4      # a papermill process and its kernel per run
    (os.killpg if to_group else os.kill)(process.pid, sig)
    return tree


def _gone(tree: list[psutil.Process], timeout_s: float) -> None:
    def alive() -> list[psutil.Process]:
        return [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    _when(lambda: not alive(), timeout_s, "every process the study started to end")


def _results(record: dict) -> dict:
    from test_slurm import results

    data = results(record)
    data["provenance_data"] = record["provenance"].get("data_identity")
    return data


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_then_the_same_command_equals_an_uninterrupted_study(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    study.run_study(study.plan_study("demo", TINY, runs_root=reference / "runs", reports_root=reference / "reports",
                                     methods=METHODS, seeds=[0], baseline=False, jobs=2), log=lambda _: None)

    cut = tmp_path / "cut"
    process = _start(cut)
    tree = _training_then(cut, process, signal.SIGINT, to_group=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    _gone(tree, 30)
    assert "Traceback" not in err and err.count("error:") == 1
    assert ("cclnb study: error: study 'demo' stopped by SIGINT: 2 running steps were interrupted (listed above); "
            "everything finished is kept; run the same command again to continue") in err
    for method in METHODS:
        run_dir = cut / "runs" / "demo" / method / "seed0"
        assert _state(run_dir) == "interrupted"
        assert f"{method} seed 0: task sequence: interrupted; its training saved its state at task 1/2, epoch" in out
        assert f"in {run_dir / 'checkpoints' / 'last.pt'} and resumes there" in out
    assert not any((cut / "reports" / "demo" / "runs").glob("*.json"))

    again = subprocess.run([sys.executable, "-m", "cclnb", *_argv(cut)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    for method in METHODS:
        name = f"{method}-seed0.json"
        resumed, uninterrupted = (json.loads((root / "reports" / "demo" / "runs" / name).read_text())
                                  for root in (cut, reference))
        assert _results(resumed) == _results(uninterrupted), method
        assert "resumed at task 0" in (cut / "runs" / "demo" / method / "seed0" / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sigkilled_study_leaves_notebooks_that_stop_cleanly(tmp_path: Path) -> None:
    """Nothing can forward a SIGKILL: each notebook process sees its parent gone (its watchdog) and
    interrupts its kernel, whose training saves and stops as on Ctrl-C."""
    from cclnb.training.checkpoint import load_checkpoint

    process = _start(tmp_path)
    tree = _training_then(tmp_path, process, signal.SIGKILL, to_group=False)
    process.wait(timeout=30)
    _gone(tree, 60)
    for method in METHODS:
        run_dir = tmp_path / "runs" / "demo" / method / "seed0"
        assert _state(run_dir) == "interrupted"
        assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["task"] == 0
