"""Watching a study: `cclnb study --status` (cclnb.study.status), the live console lines of a
running study (cclnb.study.console), the cluster jobs' states (cclnb.launch.watch) and the
TensorBoard event files beside train_log.csv (cclnb.training.events).

The states are fabricated run directories (a status.json, log rows, file times), since what
`--status` reads is files; one (method, seed) is a real short run on the embedded shapes, which
also writes the event files read back here, and whose log is the measured reference the others'
times are estimated from.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

import cclnb
from cclnb import study
from cclnb.commands import cli
from cclnb.config import TrainConfig
from cclnb.errors import ConfigError
from cclnb.study import console, explore, records, status
from cclnb.study.lock import LOCK_FILE
from cclnb.training import events, runs

from conftest import study_cli

METHODS = ["Finetuning", "SimpleReplay", "CCL", "Joint"]


# ----------------------------------------------------------------------------- the arithmetic
def test_steps_follow_the_logged_task_sizes_and_the_replay_budget() -> None:
    # tasks 0 and 1 started (400 images, then 400 + 40 replayed); 40 more replayed ids per task after
    assert status.entries_per_task({0: 400, 1: 440}, 5, 40) == [400, 440, 480, 520, 560]
    assert status.entries_per_task({0: 400}, 3, 0) == [400, 400, 400]
    assert status.entries_per_task({}, 3, 40) is None
    # the loader drops the last partial batch: 400 // 32 = 12 steps, 440 // 32 = 13, 4 epochs each
    assert status.total_steps([400, 440], 32, 4) == 4 * (12 + 13)


def test_a_resumed_log_counts_only_the_time_spent_training() -> None:
    # time_s restarts at the resume (the rows after the checkpoint at step 20 were dropped)
    rows = [(10, 5.0, 0), (20, 10.0, 0), (30, 3.0, 1), (40, 8.0, 1)]
    assert status.cumulative_profile(rows) == [(10, 5.0, 0), (20, 10.0, 0), (30, 13.0, 1), (40, 18.0, 1)]
    profile = status.cumulative_profile(rows)
    assert status.interpolate(profile, 25) == pytest.approx(11.5)
    assert status.interpolate(profile, 5) == pytest.approx(2.5)      # from the origin
    assert status.interpolate(profile, 99) == 18.0
    # seconds per step since the previous task began: (18 - 5) / (40 - 10)
    assert status.recent_rate(profile) == pytest.approx(13 / 30)


def test_time_left_from_a_finished_run_of_the_method_else_the_own_pace() -> None:
    reference = [(step, step * 1.0, step // 50) for step in range(10, 101, 10)]   # 1 s per step, 100 steps
    mine = [(step, step * 2.0, step // 50) for step in range(10, 51, 10)]          # twice as slow, at step 50
    assert status.training_left_s(mine, 100, reference) == pytest.approx(50 * 1.0 * 2)
    # without a reference: the 50 steps left at its own recent pace (2 s per step)
    assert status.training_left_s(mine, 100) == pytest.approx(100.0)
    assert status.training_left_s(mine, None) is None and status.training_left_s([], 100) is None


def test_the_study_end_replays_the_scheduler() -> None:
    # two slots busy for 10 and 20 s; then 30 starts at 10 (ends 40), 5 at 20, 5 at 25
    assert status.makespan([10, 20], [30, 5, 5], 2) == 40
    assert status.makespan([], [30, 5, 5], 1) == 40              # one at a time: the sum
    assert status.makespan([], [30, 20, 10], 2) == 30            # longest first packs two slots
    assert status.makespan([], [], 3) == 0


def test_a_study_with_nothing_finished_projects_its_running_runs(tmp_path: Path) -> None:
    """Before any (method, seed) has finished, one not started takes what a running one of another
    method is projected to take (elapsed + left), scaled by the methods' costs; an untrained
    baseline only evaluates, so it takes the measured evaluations, and nothing before any."""
    def pair(method: str) -> status.Pair:
        return status.Pair(method, 0, tmp_path, tmp_path / f"{method}-seed0.json", study.expected_cost(method), 1)

    running = [status.PairStatus("CCL", 0, status.RUNNING, elapsed_s=100.0, eta_s=70.0)]
    nothing = status._Estimates({}, None)
    assert nothing.whole(pair("Finetuning"), running) == pytest.approx(170 / study.expected_cost("CCL"))
    assert nothing.whole(pair("CCL"), running) == 170.0
    assert nothing.whole(pair("Finetuning")) is None and nothing.whole(pair("untrained"), running) is None
    evaluated = status._Estimates({"CCL": status._Measured(post_per_encoder=[6.0])}, None)
    assert evaluated.whole(pair("untrained"), running) == 6.0
    # a study that has not started: no total, and the note says what is missing
    fresh = status.study_status(study.plan_study("demo", runs_root=tmp_path / "runs", reports_root=tmp_path / "rep",
                                                 methods=["CCL", "Finetuning"], seeds=[0], baseline=False))
    assert fresh.eta_s is None and {r.state for r in fresh.rows} == {"queued"}
    assert "no total yet: nothing measured to estimate CCL, Finetuning from" in fresh.notes[0]


def test_durations_read_as_a_person_says_them() -> None:
    assert [status.duration(s) for s in (None, 12, 245, 7980, 97200)] == \
        ["?", "12 s", "4 min 05 s", "2 h 13 min", "1 d 3 h"]
    assert status.counted(0, 5) == "1/5" and status.counted(None, 5) == "-"


# ----------------------------------------------------------------------------- a study in every state
def _tiny(run_dir: Path, method: str = "Finetuning", **overrides) -> TrainConfig:
    values = dict(data="demo", dataset="demo", arch="resnet18", stem="imagenet", width=8, epochs=2, batch_size=16,
                  moco_k=32, n_tasks=2, n_save=2, method=method, subset_per_class=10, seed=0, workers=0,
                  progress=False, eval_each_task="knn", eval_bank_per_class=5, knn_k=5, key_bn_groups=2,
                  bn_groups=1, run_dir=str(run_dir), device="cpu", print_freq=2, tensorboard=True)
    return TrainConfig(**{**values, **overrides})


def _age(path: Path, seconds_ago: float) -> None:
    """Every file under `path` last changed `seconds_ago`."""
    stamp = time.time() - seconds_ago
    for file in [path, *path.rglob("*")]:
        os.utime(file, (stamp, stamp))


def _write_rows(run_dir: Path, rows: list[dict[str, str]]) -> None:
    with open(run_dir / "train_log.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """runs/demo of a study of 4 methods over seeds 0-1: Finetuning seed 0 trained for real and
    recorded (one thread: a second one only contends on a shared CPU); the others fabricated in
    every state."""
    tmp = tmp_path_factory.mktemp("study")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plan = study.plan_study("demo", runs_root=tmp / "runs", reports_root=tmp / "reports", methods=METHODS,
                            seeds=[0, 1], baseline=False)
    run_of = {(p.method, p.seed): p for p in status.plan_pairs(plan)}
    done = run_of[("Finetuning", 0)]
    try:
        cclnb.train(_tiny(done.run_dir))
    finally:
        torch.set_num_threads(threads)
    records.write_record(done.run_dir, plan.records_dir, plan.name)
    # the record 30 s after the training's end, which is 100 s after the notebook started
    real_end = time.time() - 600
    os.utime(done.run_dir / "status.json", (real_end, real_end))
    os.utime(done.record, (real_end + 30, real_end + 30))
    os.utime(done.run_dir / "config.json", (real_end - 100, real_end - 100))
    reference = runs.read_json(done.run_dir / "status.json")
    rows = list(csv.DictReader(open(done.run_dir / "train_log.csv")))

    # Finetuning seed 1 runs: the same run, at half its steps, twice as slow; its files change now
    running = run_of[("Finetuning", 1)].run_dir
    shutil.copytree(done.run_dir, running, ignore=shutil.ignore_patterns("checkpoints", "events.*"))
    half = int(reference["global_step"]) // 2
    mine = [{**r, "time_s": str(2 * float(r["time_s"]))} for r in rows if int(r["global_step"]) <= half]
    _write_rows(running, mine)
    runs.write_status(running, "running", task=int(mine[-1]["task"]), epoch=0, step=0,
                      global_step=half, n_tasks=2)

    # CCL seed 0 failed; SimpleReplay seed 0 was stopped an hour ago (status still "running")
    failed = run_of[("CCL", 0)].run_dir
    shutil.copytree(running, failed)
    runs.write_status(failed, "failed", error="TrainingDiverged: the loss became nan at task 1, epoch 0, step 3")
    stopped = run_of[("SimpleReplay", 0)].run_dir
    shutil.copytree(running, stopped)
    for method, run_dir in (("CCL", failed), ("SimpleReplay", stopped)):
        runs.write_json(run_dir / "config.json", {**runs.read_json(run_dir / "config.json"), "method": method})
    _age(stopped, 3600)
    return {"plan": plan, "tmp": tmp, "pairs": run_of, "rows": rows, "half": half}


def test_every_state_with_its_position_and_time_left(demo_study: dict) -> None:
    plan, pairs = demo_study["plan"], demo_study["pairs"]
    now = time.time()
    result = status.study_status(plan, now=now)
    rows = {(r.method, r.seed): r for r in result.rows}
    assert {key: row.state for key, row in rows.items()} == {
        ("Finetuning", 0): "done", ("SimpleReplay", 0): "preempted", ("CCL", 0): "failed", ("Joint", 0): "queued",
        ("Finetuning", 1): "running", ("SimpleReplay", 1): "queued", ("CCL", 1): "queued", ("Joint", 1): "queued"}
    assert rows[("Finetuning", 0)].detail == str(pairs[("Finetuning", 0)].record)
    assert rows[("CCL", 0)].detail.startswith("TrainingDiverged: the loss became nan")
    assert str(pairs[("CCL", 0)].run_dir / "train.log") in rows[("CCL", 0)].detail
    assert "resumes it" in rows[("SimpleReplay", 0)].detail
    # the running run: at half the reference's steps and twice as slow, so twice the reference's
    # training time from there; then the reference's 30 s from its training's end to its record
    reference = status.read_run(pairs[("Finetuning", 0)].run_dir).profile
    left = 2 * (reference[-1][1] - status.interpolate(reference, demo_study["half"]))
    running = rows[("Finetuning", 1)]
    assert running.eta_s == pytest.approx(left + 30, rel=1e-6)
    assert (running.task, running.epoch, running.n_tasks, running.epochs) == (0, 1, 2, 2)   # its last row, gs 6
    assert running.loss_moco is not None and running.img_per_s is not None
    # not started: what the finished Finetuning took (notebook start -> record: 130 s), scaled by
    # the methods' costs for the others; the stopped run needs its resume
    assert rows[("Joint", 0)].eta_s == pytest.approx(130 * study.expected_cost("Joint") / study.expected_cost("Finetuning"))
    assert rows[("CCL", 1)].eta_s == pytest.approx(130 * study.expected_cost("CCL"))
    waiting = sorted((r for r in result.rows if r.state in ("queued", "preempted")), key=lambda r: -r.cost)
    assert result.eta_s == pytest.approx(status.makespan([running.eta_s], [r.eta_s for r in waiting], plan.jobs)
                                         + status.REPORT_S)    # no earlier render of the report to time
    assert any("failed" in note for note in result.notes)
    # every (method, seed) done: the report renders, from the last record on
    finished = study.plan_study("demo", runs_root=demo_study["tmp"] / "runs", reports_root=demo_study["tmp"] / "reports",
                                methods=["Finetuning"], seeds=[0], baseline=False)
    recorded = pairs[("Finetuning", 0)].record.stat().st_mtime
    assert status.study_status(finished, now=recorded + 20).eta_s == pytest.approx(status.REPORT_S - 20)
    assert status.study_status(finished, liveness=status.Liveness(False), now=recorded + 20).eta_s == status.REPORT_S


def test_a_live_study_owns_only_the_runs_it_touched(demo_study: dict) -> None:
    """With the study's process known alive since a moment, a run whose files are older is a
    leftover of an earlier call (preempted, resumed when a slot frees); a dead study runs nothing."""
    plan = demo_study["plan"]
    now = time.time()
    alive = status.study_status(plan, liveness=status.Liveness(True, now - 60), now=now)
    states = {(r.method, r.seed): r.state for r in alive.rows}
    assert states[("Finetuning", 1)] == "running" and states[("SimpleReplay", 0)] == "preempted"
    assert "when a slot frees" in next(r.detail for r in alive.rows if r.state == "preempted")
    gone = status.study_status(plan, liveness=status.Liveness(False), now=now)
    assert not any(r.state == "running" for r in gone.rows)


def test_cli_status_shows_every_state_and_writes_nothing(demo_study: dict, capsys: pytest.CaptureFixture) -> None:
    tmp = demo_study["tmp"]
    before = {p: (p.stat().st_mtime, p.stat().st_size) for p in tmp.rglob("*")}
    argv = study_cli(tmp, "--preset", "demo", "--methods", *METHODS, "--seeds", "0", "1", "--no-baseline", "--status")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert {p: (p.stat().st_mtime, p.stat().st_size) for p in tmp.rglob("*")} == before
    for state in ("done", "running (training)", "queued", "failed", "preempted (training)"):
        assert state in out, out
    assert "study ends in about" in out and "--jobs 2" in out


def test_the_study_lock_says_whether_the_study_runs(demo_study: dict, capsys: pytest.CaptureFixture,
                                                   tmp_path: Path) -> None:
    """`--status` asks the lock `cclnb study` holds (cclnb.study.lock) by the holder it names,
    never taking it; with the holder alive since a minute ago, the run whose files changed since
    is running and the hour-old one preempted (resumed when a slot frees)."""
    import subprocess
    import sys

    lock = tmp_path / LOCK_FILE
    assert status.study_liveness(tmp_path) == status.Liveness()        # no lock: nobody to ask
    lock.write_text("")
    assert status.study_liveness(tmp_path).alive is False               # released
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    started = (datetime.datetime.now() - datetime.timedelta(seconds=60)).isoformat(timespec="seconds")
    holder = {"pid": int(ended.stdout), "host": socket.gethostname(), "started": started, "command": "cclnb study"}
    lock.write_text(json.dumps(holder))
    assert status.study_liveness(tmp_path).alive is False               # its process has ended
    lock.write_text(json.dumps({**holder, "host": "elsewhere"}))
    assert status.study_liveness(tmp_path).alive is None                # another host: not checked
    lock.write_text(json.dumps({**holder, "pid": os.getpid()}))
    alive = status.study_liveness(tmp_path)
    assert alive.alive is True and alive.since == pytest.approx(time.time() - 60, abs=2)

    runs_dir = demo_study["plan"].runs_dir
    shutil.copy(lock, runs_dir / LOCK_FILE)
    try:
        argv = study_cli(demo_study["tmp"], "--preset", "demo", "--methods", *METHODS, "--seeds", "0", "1",
                         "--no-baseline", "--status")
        assert cli.main(argv) == 0
    finally:
        (runs_dir / LOCK_FILE).unlink()
    out = capsys.readouterr().out
    assert f"held by PID {os.getpid()} on {socket.gethostname()}" in out and ": running" in out
    assert "running (training)" in out and "the study resumes it when a slot frees" in out


def test_event_files_hold_the_csv_numbers(demo_study: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = demo_study["pairs"][("Finetuning", 0)].run_dir
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    rows = demo_study["rows"]
    columns = [c for c in rows[0] if c != "global_step"]
    assert {f"train/{c}" for c in columns} <= tags
    for column in columns:
        written = [(e.step, e.value) for e in accumulator.Scalars(f"train/{column}")]
        logged = [(int(r["global_step"]), float(r[column])) for r in rows]
        assert [s for s, _ in written] == [s for s, _ in logged]
        assert [v for _, v in written] == pytest.approx([v for _, v in logged], rel=1e-5, abs=1e-6)
    with open(run_dir / "eval" / "acc_knn_student.csv") as handle:
        matrix = list(csv.DictReader(handle))
    for name in [c for c in matrix[0] if c != "after_task"]:
        written = [(e.step, e.value) for e in accumulator.Scalars(f"eval/knn_student/{name}")]
        assert written == [(int(r["after_task"]), pytest.approx(float(r[name]), abs=1e-4)) for r in matrix]


def test_a_resumed_log_shows_the_redone_steps_once(tmp_path: Path) -> None:
    """A resume drops the CSV rows after its checkpoint and logs those steps again; its event
    writer starts there (TensorBoard's purge_step), so the curves, like the CSV, hold each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def log_steps(log: runs.TrainLog, steps: range, scale: float) -> None:
        for step in steps:
            log.row({"task": 0, "epoch": 0, "step": step, "global_step": step, "loss": scale * step,
                     "loss_moco": 1.0, "lr": 0.1, "img_per_s": 10.0, "time_s": float(step)})
        log.events.close()

    log_steps(runs.TrainLog(tmp_path, tensorboard=True), range(1, 5), 1.0)
    resumed = runs.TrainLog(tmp_path, tensorboard=True)
    resumed.discard_after(2)                       # the checkpoint was at step 2
    log_steps(resumed, range(3, 5), 10.0)
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    curve = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
    with open(tmp_path / "train_log.csv") as handle:
        logged = [(int(r["global_step"]), float(r["loss"])) for r in csv.DictReader(handle)]
    assert curve == logged == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_tensorboard_is_asked_for_only_when_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert runs.TrainLog(tmp_path).events is None
    monkeypatch.setattr(events.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'cclnb\[tensorboard\]'"):
        runs.TrainLog(tmp_path, tensorboard=True)
    runs.TrainLog(tmp_path, tensorboard=False)         # never looks for it


def test_explore_plots_a_running_study_from_its_csvs(demo_study: dict, tmp_path: Path) -> None:
    found = explore.pick_study(demo_study["tmp"] / "runs", "demo")
    log, accuracy = explore.study_curves(found)
    assert set(log["run"]) == {"Finetuning/seed0", "Finetuning/seed1", "CCL/seed0", "SimpleReplay/seed0"}
    real = log[log["run"] == "Finetuning/seed0"]
    # one row per epoch: its closing row (the epoch's mean), 2 tasks x 2 epochs
    closing = {(int(r["task"]), int(r["epoch"])): float(r["loss_moco"]) for r in demo_study["rows"]}
    assert list(zip(real["task"], real["epoch"])) == sorted(closing)
    assert real["loss_moco"].tolist() == pytest.approx([closing[k] for k in sorted(closing)], rel=1e-5)
    assert accuracy[accuracy["run"] == "Finetuning/seed0"]["after_task"].tolist() == [0, 1]
    # the running run has trained half: its epochs of the first task only
    assert log[log["run"] == "Finetuning/seed1"]["task"].tolist() == [0, 0]
    fig = explore.curves_figure(found)
    loss_ax, accuracy_ax, _ = fig.axes
    assert len(loss_ax.lines) == 4 and len(accuracy_ax.lines) == 4
    assert {t.get_text().split(" (")[0] for t in loss_ax.get_legend().get_texts()} == {"Finetuning", "CCL", "SimpleReplay"}
    assert "4 runs have trained so far" in fig.get_suptitle()
    # a study whose runs have not logged a row yet: empty axes, and the title says why
    fresh = tmp_path / "runs" / "fresh" / "CCL" / "seed0"
    fresh.mkdir(parents=True)
    (fresh / "config.json").write_text(json.dumps({"method": "CCL", "seed": 0, "eval_each_task": "knn"}))
    assert "no run has logged a training row yet" in explore.curves_figure(explore.pick_study(tmp_path / "runs")).get_suptitle()


# ----------------------------------------------------------------------------- the live console
def test_live_lines_redraw_on_a_terminal_and_print_once_per_epoch_otherwise(demo_study: dict) -> None:
    plan = demo_study["plan"]
    step = next(s for s in plan.steps if s.group == "Finetuning seed 1")
    printed: list[str] = []
    plain = console.LiveLines(plan, printed.append, stream=io.StringIO(), tty=False, refresh_s=0)
    plain.show({"Finetuning seed 1": step})
    plain.show({"Finetuning seed 1": step})            # same epoch: nothing new
    assert len(printed) == 1 and printed[0].startswith("  Finetuning seed 1: task ")
    assert "img/s" in printed[0] and printed[0].endswith("left")
    screen = io.StringIO()
    with console.LiveLines(plan, printed.append, stream=screen, tty=True, refresh_s=0) as live:
        live.show({"Finetuning seed 1": step})
        live.log("[3/9] CCL seed 1: task sequence ...")
        live.show({"Finetuning seed 1": step})
    text = screen.getvalue()
    assert text.count("Finetuning seed 1: task") == 2       # drawn, redrawn under the log line; unchanged: kept
    assert "\x1b[2F\x1b[J" in text and "study: 1/8 done, ends in about" in text
    # the other phases of a job: its kernel starting, its training just ended, a linear evaluation
    row = status.PairStatus("CCL", 0, status.RUNNING, phase="evaluating", task=4, n_tasks=5, loss_moco=3.5, eta_s=25)
    assert console.job_line("CCL seed 0", step, row) == "CCL seed 0: training done, 25 s left"
    assert console.job_line("CCL seed 0", step, status.PairStatus("CCL", 0, status.RUNNING, phase="starting")) == \
        "CCL seed 0: starting, ? left"
    evaluation = next(s for s in plan.steps if s.group == "Finetuning seed 1" and s.notebook == "linear_eval")
    assert console.job_line("Finetuning seed 1", evaluation, row) == "Finetuning seed 1: linear eval (student), 25 s left"


# ----------------------------------------------------------------------------- cluster jobs
def test_cluster_jobs_speak_for_their_pairs(tmp_path: Path) -> None:
    from cclnb.launch import cluster, watch

    folder = tmp_path / "submitit-local"
    folder.mkdir()
    cluster.write_manifest(folder, {
        "CCL-seed0": cluster.Submitted(str(os.getpid()), "train.out", "train.err", "now"),
        "CCL-seed0.evaluation": cluster.Submitted("999999999", "eval.out", "eval.err", "now")})
    found = watch.job_states(tmp_path)
    # neither job is a live local executor: the last one submitted (the evaluation) speaks
    assert found == {"CCL-seed0": status.JobInfo("submitit-local", "999999999", "ENDED", "eval.out")}
    run = status.read_run(tmp_path / "nowhere")
    assert status._active(run, status.Liveness(), time.time(), found["CCL-seed0"]) is False
    waiting = status.JobInfo("slurm", "12", "PENDING", "x.out")
    assert status._active(run, status.Liveness(True, 0.0), time.time(), waiting) is False
    assert json.loads((folder / "jobs.json").read_text())["CCL-seed0"]["job_id"] == str(os.getpid())
