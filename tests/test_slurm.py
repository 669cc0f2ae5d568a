"""`cclnb study --launcher slurm|submitit-local`: the study as one submitit job per (method, seed).

Without a cluster: the batch script is generated (a dry run, and what submitit's SlurmExecutor
writes, compared), the checks made before submission run against a fake `sinfo`, training under
torchrun runs on the CPU with 2 processes and is stopped and resumed, and submitit's local
executor runs a small demo grid as jobs end to end, one of them stopped by the warning signal
SLURM sends before a time limit and requeued: its records equal a local `cclnb study`'s. The bad
inputs refused before submission are rows of tests/test_catalogue.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

from cclnb import study
from cclnb.commands import cli
from cclnb.errors import ConfigError
from cclnb.launch import cluster, job, torchrun
from cclnb.launch import resources as res

REPO = Path(__file__).resolve().parents[1]
# The demo on 2 tasks of 5 shapes, 24 train images per class, 2 epochs: 7 steps per epoch, long
# enough to stop mid-training, seconds per notebook (batch 16 in 2 BatchNorm groups of 8).
SMALL = ["subset_per_class=24", "n_tasks=2", "epochs=2", "batch_size=16", "bn_groups=2", "key_bn_groups=2",
         "moco_k=64", "ccl_k=16", "n_save=2", "knn_k=5", "progress=False", "linear_eval.subset_per_class=8",
         "linear_eval.progress=False"]
METHODS = ["Finetuning", "CCL"]


def fake_slurm(folder: Path, partitions: str = "cpu*|(null)\ngpu|gpu:a100:4(S:0-1)\ngpu|gpu:a100:8\n") -> str:
    """A PATH holding a `sinfo` that lists `partitions` (one `name|gres` per line) and an `srun`
    (submitit's SlurmExecutor looks for it), before the real PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sinfo").write_text(f"#!/bin/sh\ncat <<'EOF'\n{partitions}EOF\n")
    (folder / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sinfo", "srun"):
        (folder / tool).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def study_argv(tmp: Path, *extra: str, params: list[str] = SMALL) -> list[str]:
    return ["study", "--preset", "demo", *[x for p in params for x in ("-p", p)], "--seeds", "0",
            "--no-baseline", "--runs-root", str(tmp / "runs"), "--reports-root", str(tmp / "reports"), *extra]


# ----------------------------------------------------------------------------- resources
def test_torchrun_options_for_one_and_several_nodes() -> None:
    assert torchrun.options(1, 8) == ["--standalone", "--nnodes", "1", "--nproc_per_node", "8"]
    assert torchrun.options(2, 4, 1, "node-a", 20123) == [
        "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4", "--master_addr", "node-a",
        "--master_port", "20123"]
    with pytest.raises(ConfigError, match="address and port of node 0"):
        torchrun.options(2, 4)
    assert torchrun.command("c.json", ["--standalone"])[1:] == [
        "-m", "torch.distributed.run", "--standalone", "-m", "cclnb.launch.torchrun", "c.json"]
    assert res.Resources(gpus_per_node=1).torchrun_args() == []       # one process: trains in the kernel
    assert res.Resources(nodes=2).world_size == 2 and res.Resources(gpus_per_node=8).uses_torchrun
    assert job.master_port("123456") == 20000 + 123456 % 20000


@pytest.mark.parametrize("text, minutes", [("90", 90), ("30:30", 31), ("2:00:00", 120), ("1-0", 1440),
                                           ("1-12:30", 2190), ("0-0:0:1", 1)])
def test_slurm_time_formats(text: str, minutes: int) -> None:
    assert res.parse_time(text) == minutes


def test_sbatch_lines_and_the_options_they_must_not_replace() -> None:
    assert res.parse_sbatch(["constraint=a100", "--qos=high", "exclusive", "mail-type=END"]) == (
        ("constraint", "a100"), ("qos", "high"), ("exclusive", True), ("mail_type", "END"))
    for bad, message in [("partition=gpu", "set by --partition"), ("--time=10", "set by --time"),
                         ("gres=gpu:2", "set by --gpus-per-node"), ("bad value", "name=value"), ("qos=", "name=value")]:
        with pytest.raises(ConfigError, match=message):
            res.parse_sbatch([bad])
    with pytest.raises(ConfigError, match="--time '1h'"):
        res.parse_time("1h")


def test_every_preset_has_an_allocation_sized_for_it() -> None:
    assert set(res.PRESETS) <= set(study.PRESETS)
    for name, preset in study.PRESETS.items():
        devices = [preset.task_sequence.get("device"), preset.linear_eval.get("device")]
        assert (res.for_preset(name, devices).gpus_per_node > 0) == ("cuda" in devices), name
    paper = res.PRESETS["imagenet-sub"]
    assert (paper.gpus_per_node, paper.world_size) == (8, 8)      # the authors' 8 GPUs per run
    baseline = paper.evaluation_only()                            # the untrained baselines never train
    assert (baseline.nodes, baseline.gpus_per_node, baseline.cpus_per_task, baseline.mem_gb) == (1, 1, 8, 32)
    assert res.PRESETS["demo"].evaluation_only() == res.PRESETS["demo"]
    assert res.for_preset("new", ["cuda"]).gpus_per_node == 1 and res.for_preset("new", ["cpu"]).gpus_per_node == 0


def test_partitions_from_sinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_slurm(tmp_path))
    found = res.partitions()
    assert found == {"cpu": (True, 0), "gpu": (False, 8)}
    res.check_partition(res.Resources(), found)                                   # the default, no GPU
    res.check_partition(res.Resources(gpus_per_node=8, partition="gpu"), found)
    with pytest.raises(ConfigError, match=r"'cpu' has nodes with at most 0 GPU\(s\).*--partition gpu"):
        res.check_partition(res.Resources(gpus_per_node=2), found)
    with pytest.raises(ConfigError, match="no default partition"):
        res.check_partition(res.Resources(), {"gpu": (False, 8)})
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert res.partitions() is None


def test_shared_storage_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"the records folder .* is under /tmp.*--assume-shared-fs"):
        res.check_shared({"records folder": Path("/tmp/x/reports/demo/runs")})
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nserver:/home /home nfs4 rw 0 0\n"
                      "lustre@tcp:/scratch /scratch\\040space lustre rw 0 0\n")
    assert res._mount_of(Path("/home/me/runs"), str(mounts)) == ("/home", "nfs4")
    assert res._mount_of(Path("/scratch space/x"), str(mounts)) == ("/scratch space", "lustre")
    assert res._mount_of(Path("/homework"), str(mounts)) == ("/", "ext4")
    monkeypatch.setattr(res, "_mount_of", lambda path: ("/home", "nfs4"))
    res.check_shared({"runs root": Path("/home/me/runs")})                       # shared: accepted
    monkeypatch.setattr(res, "_mount_of", lambda path: ("/", "ext4"))
    with pytest.raises(ConfigError, match=r"the runs root /home/me/runs is on a local ext4 file system"):
        res.check_shared({"runs root": Path("/home/me/runs")})


# ----------------------------------------------------------------------------- the batch script
def _dry_run(tmp: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    argv = study_argv(tmp, "--launcher", "slurm", "--dry-run", "--assume-shared-fs", *extra)
    capsys.readouterr()
    assert cli.main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_dry_run_shows_the_batch_script_and_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_slurm(tmp_path / "bin"))
    out = _dry_run(tmp_path, capsys, "--methods", *METHODS, "--gpus-per-node", "4", "--partition", "gpu",
                   "--cpus-per-task", "32", "--mem-gb", "64", "--time", "2:00:00", "--account", "lab",
                   "--sbatch", "constraint=a100", "--setup", "module load cuda/12.4",
                   "-p", "bn_groups=4", "-p", "key_bn_groups=4", "-p", "device=cuda", "-p", "linear_eval.device=cuda")
    assert out.count("#!/bin/bash") == 2 and "=== CCL seed 0: job script ===" in out
    script = out.split("=== CCL seed 0: job script ===")[1]
    for line in ["#SBATCH --gpus-per-node=4", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --mem=64GB", "#SBATCH --time=120",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --constraint=a100",
                 "#SBATCH --job-name=cclnb-demo-CCL-seed0", "#SBATCH --signal=USR2@120",
                 # the environment: the submitting shell's, from its folder, plus the setup lines
                 "#SBATCH --export=ALL", f"#SBATCH --chdir={Path.cwd()}", "module load cuda/12.4",
                 # the training: 4 processes under torchrun, from the task-sequence notebook
                 "-m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 4 -m cclnb.launch.torchrun",
                 # the job: submitit runs the pickled StudyJob with this interpreter
                 f"-u -m submitit.core._submit {tmp_path / 'runs' / 'demo' / 'slurm'}"]:
        assert line in script, line
    assert "it runs, in order: task sequence; linear eval (student); linear eval (teacher); record" in script
    assert "4 processes under torchrun" in out and "nothing submitted" in out
    assert not (tmp_path / "runs" / "demo" / "slurm" / cluster.MANIFEST).exists()
    assert not (tmp_path / "runs" / "demo" / "CCL").exists()

    # two nodes: a static rendezvous at node 0; the CPU demo trains in one process, in the kernel
    two = _dry_run(tmp_path, capsys, "--methods", "Joint", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                   "-p", "batch_size=32", "-p", "bn_groups=8", "-p", "key_bn_groups=8",
                   "-p", "device=cuda", "-p", "linear_eval.device=cuda")
    assert "--nnodes 2 --node_rank 0 --nproc_per_node 4 --master_addr" in two and "own --node_rank" in two
    assert "one process, in the task-sequence notebook's kernel" in _dry_run(tmp_path, capsys, "--methods", "Joint")


def test_the_dry_run_script_is_what_submitit_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run renders the script with submitit's writer; SlurmExecutor must write the same."""
    import submitit

    monkeypatch.setenv("PATH", fake_slurm(tmp_path / "bin"))
    backend = cluster.SlurmBackend(tmp_path / "slurm")
    allocation = res.Resources(gpus_per_node=2, partition="gpu", setup=("module load x",))
    executor = backend.executor("cclnb-demo-CCL-seed0", allocation)
    assert isinstance(executor, submitit.SlurmExecutor)
    assert executor._submitit_command_str == backend.command
    assert (executor._make_submission_file_text(backend.command, "uid")
            == backend.script("cclnb-demo-CCL-seed0", allocation))


# ----------------------------------------------------------------------------- torchrun
def _when(condition: Callable[[], bool], timeout_s: float, what: str, detail: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s} s for {what}; {detail()}")
        time.sleep(0.2)


def _state(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "status.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_notebook_trains_under_torchrun_stops_on_sigterm_and_resumes(tmp_path: Path) -> None:
    """What the task-sequence notebook does in a multi-GPU job, on the CPU: 2 processes (gloo)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    run_dir = tmp_path / "run"
    parameters = dict(data="demo", dataset="demo", method="SimpleReplay", n_tasks=2, epochs=2, subset_per_class=24,
                      batch_size=16, bn_groups=2, key_bn_groups=2, moco_k=64, ccl_k=16, n_save=2, stem="imagenet",
                      device="cpu", precision="fp32", seed=0, eval_each_task="none", progress=False,
                      run_dir=str(run_dir), torchrun_args=torchrun.options(1, 2))

    def notebook(name: str, **extra: Any) -> None:
        papermill.execute_notebook(str(study.notebook_path("task_sequence")), str(tmp_path / name),
                                   parameters={**parameters, **extra}, kernel_name="python3", progress_bar=False,
                                   cwd=str(tmp_path))

    def stop_torchrun() -> None:   # as a stopped job does (cclnb.launch), once the workers train: the
        # workers get SIGTERM directly; through torchrun's agent they would be killed 30 s into their
        # save, which a loaded 2-core machine can exceed (seen once: RankLost instead of Interrupted)
        _when(lambda: _state(run_dir) == "running", 300, "the workers to train")
        [agent] = [p for p in psutil.Process().children(recursive=True)
                   if "torch.distributed.run" in " ".join(p.cmdline())]
        for worker in agent.children():
            worker.send_signal(signal.SIGTERM)

    stopper = threading.Thread(target=stop_torchrun, daemon=True)
    stopper.start()
    with pytest.raises(PapermillExecutionError, match=r"Interrupted.*stopped by a signal at task 0.*resume="):
        notebook("first.ipynb")
    stopper.join()
    assert _state(run_dir) == "interrupted" and (run_dir / "checkpoints" / "last.pt").is_file()

    notebook("resumed.ipynb", resume=str(run_dir))
    assert _state(run_dir) == "complete"
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    assert "resumed at task 0" in (run_dir / "train.log").read_text()


# ----------------------------------------------------------------------------- jobs end to end
def results(record: dict[str, Any]) -> dict[str, Any]:
    """What two records of the same (method, seed) and settings must share: everything but where
    and when it ran, i.e. the provenance (commit, device, start), the throughput, the run
    directory, and the timings in the loss table and the final evaluations."""
    data = copy.deepcopy(record)
    for key in ("provenance", "throughput"):
        data.pop(key)
    data["config"].pop("run_dir")
    for result in data["final"].values():
        result.pop("time_s", None)
    columns = data["train_loss"]["columns"]
    kept = [i for i, name in enumerate(columns) if name not in ("img_per_s", "time_s")]
    data["train_loss"] = {"columns": [columns[i] for i in kept],
                          "rows": [[row[i] for i in kept] for row in data["train_loss"]["rows"]]}
    return data


def _job_log(tmp: Path, key: str) -> str:
    entry = cluster.read_manifest(tmp / "runs" / "demo" / "submitit-local")[key]
    return "".join(Path(p).read_text() for p in (entry.log, entry.errors) if Path(p).is_file())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_executor_jobs_equal_a_local_study_and_resume_after_the_time_limit_warning(tmp_path: Path) -> None:
    # Two CPUs per job where the local study gives each notebook one: the demo pins one thread
    # (Preset.threads), so a job must compute exactly as the local study does.
    threads = 2
    local = study.plan_study("demo", SMALL, runs_root=tmp_path / "local" / "runs", methods=METHODS,
                             reports_root=tmp_path / "local" / "reports", seeds=[0], baseline=False, jobs=2)
    study.run_study(local, log=lambda _: None)
    logs = [p.read_text() for p in (tmp_path / "local" / "runs" / "demo").glob("*/seed0/task_sequence.log")]
    assert len(logs) == 2 and all("Executing Cell 1" in log and "TCP" not in log for log in logs)

    jobs = tmp_path / "jobs"
    argv = study_argv(jobs, "--methods", *METHODS, "--launcher", "submitit-local", "--cpus-per-task", str(threads))
    assert cli.main(argv) == 0                                   # submits both and returns
    manifest = cluster.read_manifest(jobs / "runs" / "demo" / "submitit-local")
    assert sorted(manifest) == ["CCL-seed0", "Finetuning-seed0"]

    # the warning SLURM sends before a time limit (submitit's USR2), to CCL's job while it trains
    ccl = jobs / "runs" / "demo" / "CCL" / "seed0"
    _when(lambda: _state(ccl) == "running", 300, "CCL to train", lambda: _job_log(jobs, "CCL-seed0"))
    [task] = psutil.Process(int(manifest["CCL-seed0"].job_id)).children()
    task.send_signal(job.preemption_signal())

    # the same command again submits nothing: it waits for both jobs and renders the report
    assert cli.main([*argv, "--wait"]) == 0, _job_log(jobs, "CCL-seed0")
    assert cluster.read_manifest(jobs / "runs" / "demo" / "submitit-local") == manifest
    log = _job_log(jobs, "CCL-seed0")
    assert "Calling checkpoint method" in log and "Requeued job" in log
    assert "resumed at task" in (ccl / "train.log").read_text()
    assert (jobs / "reports" / "demo" / "index.html").is_file()
    for method in METHODS:
        name = f"{method}-seed0.json"
        ran_here, ran_as_job = (json.loads((root / "reports" / "demo" / "runs" / name).read_text())
                                for root in (tmp_path / "local", jobs))
        assert results(ran_as_job) == results(ran_here), method
        assert ran_as_job["final"]["student"]["top1"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_job_is_listed_and_a_finished_record_is_left_alone(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    records = tmp_path / "reports" / "demo" / "runs"
    records.mkdir(parents=True)
    finished = records / "Finetuning-seed0.json"
    shutil.copy(REPO / "reports" / "demo" / "runs" / "Finetuning-seed0.json", finished)
    before = (finished.stat().st_mtime_ns, hashlib.sha256(finished.read_bytes()).hexdigest())
    # CCL's extra queue must fit in the main queue: its job fails in the task-sequence notebook
    argv = study_argv(tmp_path, "--methods", *METHODS, "--launcher", "submitit-local", "--cpus-per-task", "1",
                      "--wait", params=[*SMALL, "ccl_k=100000"])
    assert cli.main(argv) == study.StudyStepFailed.exit_code
    out, err = capsys.readouterr()
    assert "Finetuning seed 0: finished, record" in out and "not submitted" in out
    assert re.search(r"1 \(method, seed\) of 2 have no record: CCL seed 0 \(.*--ccl-k 100000", err), err
    assert before == (finished.stat().st_mtime_ns, hashlib.sha256(finished.read_bytes()).hexdigest())
    assert sorted(cluster.read_manifest(tmp_path / "runs" / "demo" / "submitit-local")) == ["CCL-seed0"]
    page = (tmp_path / "reports" / "demo" / "index.html").read_text(encoding="utf-8")
    assert "1 (method, seed) without a record" in page and "CCL seed 0: job" in page
    assert "_log.out" in page and "--ccl-k 100000 must be between 1 and --moco-k 64" in page

    # --report-only renders what exists and lists the same pair
    capsys.readouterr()
    assert cli.main(study_argv(tmp_path, "--methods", *METHODS, "--launcher", "submitit-local",
                               "--report-only", params=[*SMALL, "ccl_k=100000"])) == 0
    assert "missing: CCL seed 0 (job" in capsys.readouterr().out
