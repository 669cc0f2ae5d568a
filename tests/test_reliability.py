"""Runs killed with SIGKILL at any moment resume to the state of a run never interrupted, and a
rank that dies under torchrun stops the others quickly, leaving only complete checkpoints.

Everything here is a real `cclnb train` process killed from outside: no in-process shortcut can
show what a kill -9 leaves on disk. One lineage of processes is killed at five seeded points
(mid-epoch in task 0, during replay selection, during evaluation, in the middle of a checkpoint
write, mid-epoch in task 1 where CCL's extra losses are active), each time resumed with
`--resume`, and its end state is compared with one uninterrupted run. Chaining the kills keeps
the cost to one run plus one process start-up per kill (~12 s each on 2 cores); every resume
still starts from exactly what a kill left behind.

Selection and evaluation take well under a second on this tiny run, so a small harness pauses at
their start and leaves a marker; the kill then lands inside that phase by construction instead of
by luck. The harness changes no computation.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from cclnb.training.checkpoint import load_checkpoint

SEED = 8   # draws the mid-epoch kill steps and the delays inside the paused phases
PAUSE_S = 0.6
WAIT_S = 240

TRAIN_ARGS = ["--data", "demo", "-a", "resnet18", "--stem", "imagenet", "--epochs", "2", "-b", "16",
              "--moco-k", "64", "--ccl-k", "16", "--n-tasks", "2", "--n-save", "2", "--method", "CCL",
              "--subset-per-class", "10", "--key-bn-groups", "4", "--bn-groups", "2", "--eval-each-task", "knn", "--knn-k", "5",
              "--deterministic", "--device", "cpu", "--seed", "0", "--save-every", "1", "-p", "1",
              "--no-progress"]
STEPS_PER_EPOCH = 3      # 50 images (task 0) or 50 + 10 replayed (task 1), batch 16, drop_last

HARNESS = textwrap.dedent("""
    # `cclnb train` with a pause at the start of replay selection and of each evaluation; the
    # pause writes a line to $CCLNB_TEST_EVENTS first, so a test can kill inside that phase.
    import os, sys, time
    from cclnb.commands import cli
    from cclnb.training.methods.ccl import CCL
    import cclnb.evaluate.per_task

    def paused(name, real):
        def wrapper(*args, **kwargs):
            with open(os.environ["CCLNB_TEST_EVENTS"], "a") as events:
                events.write(name + "\\n")
            time.sleep(float(os.environ["CCLNB_TEST_PAUSE"]))
            return real(*args, **kwargs)
        return wrapper

    CCL.select_replay = paused("select", CCL.select_replay)
    cclnb.evaluate.per_task.evaluate_encoder = paused("evaluate", cclnb.evaluate.per_task.evaluate_encoder)
    sys.exit(cli.main(sys.argv[1:]))
""")


def _env(**extra: str) -> dict[str, str]:
    """One BLAS thread: the kernels (and so the bits) are the same in every process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _train_cmd(run_dir: Path, *extra: str, harness: Path | None = None) -> list[str]:
    entry = [str(harness)] if harness else ["-m", "cclnb"]
    return [sys.executable, *entry, "train", *TRAIN_ARGS, "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """The uninterrupted run, started in the background at once; call the result to wait for it."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.Popen(_train_cmd(run_dir), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def wait() -> Path:
        out, _ = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, out[-3000:]
        return run_dir

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- kill triggers
def _log_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "train_log.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def after_step(task: int, epoch: int, step: int) -> Callable[[Path, Path], bool]:
    """Mid-epoch: fires once train_log.csv has the row of (task, epoch, step); the kill lands in
    the step after it."""
    def fired(run_dir: Path, events: Path) -> bool:
        return any((r["task"], r["epoch"], r["step"]) == (str(task), str(epoch), str(step))
                   for r in _log_rows(run_dir))
    return fired


def in_phase(name: str) -> Callable[[Path, Path], bool]:
    """Inside the harness's pause at the start of `name` (select / evaluate)."""
    def fired(run_dir: Path, events: Path) -> bool:
        return events.is_file() and name in events.read_text().split()
    return fired


def writing(name: str) -> Callable[[Path, Path], bool]:
    """The temporary file of checkpoints/`name` exists: its write has begun, the rename not yet."""
    def fired(run_dir: Path, events: Path) -> bool:
        folder = run_dir / "checkpoints"
        return folder.is_dir() and any(p.name.startswith(f".{name}.") and p.name.endswith(".tmp")
                                       for p in os.scandir(folder))
    return fired


def kill_when(cmd: list[str], run_dir: Path, events: Path, fired: Callable[[Path, Path], bool],
              delay_s: float) -> subprocess.Popen:
    """Start `cmd`, SIGKILL it `delay_s` after `fired` turns true; fail if it ends on its own."""
    events.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=_env(CCLNB_TEST_EVENTS=str(events), CCLNB_TEST_PAUSE=str(PAUSE_S)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + WAIT_S
    while not fired(run_dir, events):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before its kill point:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the kill point never came")
        time.sleep(0.002)
    if delay_s:
        time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return proc


def assert_checkpoints_load(run_dir: Path) -> dict:
    """Every checkpoint file on disk is complete (weights_only load); returns last.pt."""
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):
        load_checkpoint(path)
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def assert_same_tree(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------- the tests
def test_sigkill_at_seeded_points_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    rng = np.random.default_rng(SEED)
    run = tmp_path / "run"
    events = tmp_path / "events.txt"
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    resume = ("--resume", str(run))
    step_t0, step_t1 = (int(s) for s in rng.integers(1, STEPS_PER_EPOCH, size=2))   # not the last step

    # 1. mid-epoch, task 0 epoch 1 (last.pt holds the end of epoch 0)
    kill_when(_train_cmd(run, harness=harness), run, events, after_step(0, 1, step_t0), 0.0)
    last = assert_checkpoints_load(run)
    assert (last["task"], last["epoch"], last["step"]) == (0, 1, 0)
    assert json.loads((run / "status.json").read_text())["state"] == "running"   # a kill writes nothing

    # 2. during replay selection after task 0: nothing of it is on disk yet
    kill_when(_train_cmd(run, *resume, harness=harness), run, events, in_phase("select"),
              float(rng.uniform(0, PAUSE_S / 2)))
    assert not (run / "replay" / "task_0.json").exists()
    last = assert_checkpoints_load(run)
    assert (last["task"], last["epoch"]) == (0, 1)

    # 3. during the evaluation after task 0: the replay ids are written, the accuracy row is not
    kill_when(_train_cmd(run, *resume, harness=harness), run, events, in_phase("evaluate"),
              float(rng.uniform(0, PAUSE_S / 2)))
    assert (run / "replay" / "task_0.json").is_file()
    assert not (run / "eval" / "acc_knn_student.csv").exists()
    assert assert_checkpoints_load(run)["task"] == 0

    # 4. right after the write of the end-of-task checkpoint task_0.pt begins: its temporary file
    #    is left half written, the complete checkpoints before it still load, and last.pt must
    #    not yet claim task 0 is done (else the resume would never write task_0.pt)
    kill_when(_train_cmd(run, *resume, harness=harness), run, events, writing("task_0.pt"), 0.0)
    partial = [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert partial, "the kill was meant to land in the middle of a checkpoint write"
    last = assert_checkpoints_load(run)
    assert (last["task"], last["epoch"]) == (0, 1), "last.pt must still be the previous complete state"

    # 5. mid-epoch, task 1 epoch 1 (replayed samples, extra queue and distillation are active)
    kill_when(_train_cmd(run, *resume, harness=harness), run, events, after_step(1, 1, step_t1), 0.0)
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir()), \
        "the next complete save removes a temporary file left by a kill"
    last = assert_checkpoints_load(run)
    assert (last["task"], last["epoch"]) == (1, 1)
    assert (run / "checkpoints" / "task_0.pt").is_file()

    # resume to the end and compare with the uninterrupted run
    done = subprocess.run(_train_cmd(run, *resume), env=_env(), capture_output=True, text=True,
                          timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = reference()
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "task_0.pt", "task_1.pt"]
    for name in ("last.pt", "task_0.pt", "task_1.pt"):
        mine, theirs = load_checkpoint(run / "checkpoints" / name), load_checkpoint(ref / "checkpoints" / name)
        for part in ("model", "teacher", "method", "optimizer", "replay", "task", "epoch", "step",
                     "global_step", "seed", "generator", "rng"):
            assert_same_tree(mine[part], theirs[part], f"{name}:{part}")
    for t in (0, 1):
        assert (run / "replay" / f"task_{t}.json").read_text() == (ref / "replay" / f"task_{t}.json").read_text()
    assert (run / "eval" / "acc_knn_student.csv").read_text() == (ref / "eval" / "acc_knn_student.csv").read_text()
    # the loss log reads as one run: the rows of the work each kill lost were dropped on resume
    timeless = [{k: v for k, v in r.items() if k not in ("img_per_s", "time_s")} for r in _log_rows(run)]
    assert timeless == [{k: v for k, v in r.items() if k not in ("img_per_s", "time_s")} for r in _log_rows(ref)]


# ----------------------------------------------------------------------------- torchrun, a rank dies
def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun started (read from their environment)."""
    pids: dict[int, int] = {}
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [e for e in environ if e.startswith(b"RANK=")]
        if rank:
            pids[int(rank[0][5:])] = int(child)
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc (Linux)")
def test_a_rank_killed_under_torchrun_stops_the_other_with_a_message_and_no_partial_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [a for a in TRAIN_ARGS if a not in ("--deterministic",)]
    args[args.index("knn")] = "none"            # --eval-each-task none: the kill is the subject here
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cclnb", "train", *args, "--epochs", "3", "--run-dir", str(run), "--dist-timeout", "30"]
    launcher = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not after_step(0, 1, 1)(run, tmp_path / "unused"):   # epoch 0's checkpoint is written
            assert launcher.poll() is None, launcher.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training never reached task 0, epoch 1"
            time.sleep(0.01)
        pids = _rank_pids(launcher)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = launcher.communicate(timeout=120)
        stopped_after = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    # torchrun notices the dead worker, and rank 0's next collective fails at once (gloo sees the
    # closed socket); a rank that hangs instead is caught by --dist-timeout
    assert launcher.returncode != 0
    assert stopped_after < 60, f"the surviving rank took {stopped_after:.0f} s to stop"
    assert "rank 0 of 2 lost contact with the other processes" in out and f"--resume {run}" in out
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "RankLost" in status["error"]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")] == []
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["task"] == 0 and last["epoch"] >= 1 and last["step"] == 0   # an epoch boundary, complete


@pytest.mark.parametrize("message, lost", [
    ("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:33478", True),   # a rank died
    ("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:8344: Connection reset by peer", True),
    ("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation", True),  # hung
    ("The size of tensor a (4) must match the size of tensor b (3)", False),                   # a bug
])
def test_only_a_failed_collective_is_reported_as_a_lost_rank(message, lost):
    """The backends' messages as seen on this machine (gloo 2 ranks: SIGKILL, and a rank asleep
    past the process group's timeout); any other error keeps its own message."""
    from cclnb.training.dist import DistContext, lost_peer

    two = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    one = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert lost_peer(RuntimeError(message), two) is lost
    assert lost_peer(RuntimeError(message), one) is False
    assert lost_peer(ValueError(message), two) is False


def test_git_commit_says_when_the_code_differs_from_the_commit(tmp_path: Path) -> None:
    """Records and runs carry `git_commit`; a result made with uncommitted code changes must say
    so, while edited docs or untracked result files do not make the code dirty."""
    from cclnb.training.runs import git_commit

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "cclnb").mkdir()
    (tmp_path / "cclnb" / "code.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("docs\n")
    subprocess.run([*git, "add", "cclnb/code.py", "README.md"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("results\n")
    (tmp_path / "README.md").write_text("docs, edited\n")
    assert git_commit(tmp_path / "cclnb") == head
    (tmp_path / "cclnb" / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "cclnb") == head + "+dirty"


def test_short_commit_keeps_the_dirty_mark() -> None:
    """Tables shorten the commit; cutting the string would drop "+dirty" (it comes after 40 hex)."""
    from cclnb.training.runs import short_commit

    assert short_commit("0123456789abcdef" * 2 + "01234567+dirty") == "0123456789+dirty"
    assert short_commit("0123456789abcdef" * 2 + "01234567", 12) == "0123456789ab"
    assert short_commit(None) == "?"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def test_run_files_and_records_follow_the_users_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Every file a run or a study writes atomically (config, status, logs, accuracies, records,
    lincls results: `runs.write_json` and its kin) gets the mode a plain `open` would give it.
    They were written through mkstemp, always 0600: under umask 022 colleagues on a shared file
    system could read a study's checkpoints (0644) but not its records or statuses."""
    from cclnb.training import runs

    previous = os.umask(umask)
    try:
        runs.write_json(tmp_path / "record.json", {"a": 1})
        runs.write_status(tmp_path, "running")
        runs.write_accuracy_row(tmp_path, "knn", "student", 0, [50.0], 50.0)
        log = runs.TrainLog(tmp_path)
        log.row({"task": 0, "global_step": 1})
        log.row({"task": 0, "global_step": 2})
        log.discard_after(1)          # rewrites the file through a temporary one
    finally:
        os.umask(previous)
    written = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
               for p in tmp_path.rglob("*") if p.is_file()}
    assert set(written) == {"record.json", "status.json", "eval/acc_knn_student.csv", "train_log.csv"}
    assert written == dict.fromkeys(written, mode)
