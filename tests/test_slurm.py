"""`cclnb study --launcher slurm|submitit-local`: the study as submitit jobs per (method, seed).

Against a real one-node SLURM where ../shared/tools/slurm-single-node.sh can start one (marked
`slurm`, skipped with the reason elsewhere): the demo grid with the seed's evaluation job depending
on both training jobs, one training preempted and requeued, records equal to a local study's.

Without a cluster: the batch script is generated (a dry run, and what submitit's SlurmExecutor
writes, compared), the checks made before submission run against a fake `sinfo`, training under
torchrun runs on the CPU with 2 processes and is stopped and resumed, and submitit's local
executor runs a small demo grid as training jobs and dependent evaluation jobs end to end, one
training stopped by the warning signal SLURM sends before a time limit and requeued, one evaluation
job killed and resubmitted alone: the records equal a local `cclnb study`'s; and one evaluation job
per seed training every lincls classifier in one pass, its records equal to a local study's. The bad
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
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

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
    # 4 GPUs per training job: each seed's evaluations get one 1-GPU job, after all its trainings
    assert out.count("#!/bin/bash") == 3 and "layout: shared" in out
    script = out.split("=== CCL seed 0: training job script ===")[1].split("===")[0]
    evaluation = out.split("=== seed 0: evaluation job script (Finetuning-seed0_JOB_ID, CCL-seed0_JOB_ID: "
                           "the ids its training jobs get) ===")[1]
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
    assert "it runs, in order: task sequence\n" in script and "--dependency" not in script
    for line in ["#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=16GB",
                 "#SBATCH --dependency=afterok:Finetuning-seed0_JOB_ID:CCL-seed0_JOB_ID",
                 "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --job-name=cclnb-demo-seed0-eval",
                 "#SBATCH --time=120", "#SBATCH --partition=gpu",
                 # the demo's probe protocol has no pass to share: one evaluation after the other
                 "it runs, in order: linear eval (student); linear eval (student); linear eval (teacher); "
                 "record; record"]:
        assert line in evaluation, line
    assert "torch.distributed.run" not in evaluation
    assert "4 processes under torchrun" in out and "nothing submitted" in out
    assert "no throughputs are known for preset 'demo'" in out                 # no cost without rates
    assert not (tmp_path / "runs" / "demo" / "slurm" / cluster.MANIFEST).exists()
    assert not (tmp_path / "runs" / "demo" / "CCL").exists()

    # the lincls protocol: the seed's three encoders train their classifiers in one pass
    lincls = _dry_run(tmp_path, capsys, "--methods", *METHODS, "--gpus-per-node", "4", "--partition", "gpu",
                      "-p", "bn_groups=4", "-p", "key_bn_groups=4", "-p", "device=cuda", "-p", "linear_eval.device=cuda",
                      "-p", "linear_eval.protocol=lincls")
    assert ("it runs, in order: linear evals in one pass (3 encoders: Finetuning seed 0 student, CCL seed 0 "
            "student, CCL seed 0 teacher); record; record") in lincls

    # --eval-job separate: an evaluation job per pair, after its own training job
    separate = _dry_run(tmp_path, capsys, "--methods", "CCL", "--gpus-per-node", "4", "--partition", "gpu",
                        "--eval-job", "separate", "-p", "bn_groups=4", "-p", "key_bn_groups=4",
                        "-p", "device=cuda", "-p", "linear_eval.device=cuda")
    assert separate.count("#!/bin/bash") == 2 and "layout: separate (--eval-job)" in separate
    assert "=== CCL seed 0: evaluation job script (CCL-seed0_JOB_ID: the id its training job gets) ===" in separate
    assert "#SBATCH --dependency=afterok:CCL-seed0_JOB_ID" in separate
    assert "#SBATCH --job-name=cclnb-demo-CCL-seed0-eval" in separate

    # --eval-job with-training: one job per pair runs every step, as before issue 42
    inline = _dry_run(tmp_path, capsys, "--methods", "CCL", "--gpus-per-node", "4", "--partition", "gpu",
                      "--eval-job", "with-training", "-p", "bn_groups=4", "-p", "key_bn_groups=4",
                      "-p", "device=cuda", "-p", "linear_eval.device=cuda")
    assert inline.count("#!/bin/bash") == 1 and "=== CCL seed 0: job script ===" in inline
    assert "it runs, in order: task sequence; linear eval (student); linear eval (teacher); record" in inline

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
    evaluation = backend.executor("cclnb-demo-seed0-eval", allocation.evaluation_only(), ["1234", "1235"], "evaluate")
    text = evaluation._make_submission_file_text(backend.command, "uid")
    assert text == backend.script("cclnb-demo-seed0-eval", allocation.evaluation_only(), ["1234", "1235"], "evaluate")
    assert "#SBATCH --dependency=afterok:1234:1235" in text and "#SBATCH --gpus-per-node=1" in text


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
        result.pop("epoch_s", None)
    columns = data["train_loss"]["columns"]
    kept = [i for i, name in enumerate(columns) if name not in ("img_per_s", "time_s")]
    data["train_loss"] = {"columns": [columns[i] for i in kept],
                          "rows": [[row[i] for i in kept] for row in data["train_loss"]["rows"]]}
    return data


def _job_log(tmp: Path, key: str, launcher: str = "submitit-local") -> str:
    entry = cluster.read_manifest(tmp / "runs" / "demo" / launcher)[key]
    return "".join(Path(p).read_text() for p in (entry.log, entry.errors) if Path(p).is_file())


@pytest.fixture(scope="module")
def local_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo grid (METHODS, seed 0) run by a local `cclnb study`, once per module: the
    records every launcher's jobs must equal. Returns its root (runs/, reports/)."""
    root = tmp_path_factory.mktemp("local")
    local = study.plan_study("demo", SMALL, runs_root=root / "runs", methods=METHODS,
                             reports_root=root / "reports", seeds=[0], baseline=False, jobs=2)
    study.run_study(local, log=lambda _: None)
    logs = [p.read_text() for p in (root / "runs" / "demo").glob("*/seed0/task_sequence.log")]
    assert len(logs) == 2 and all("Executing Cell 1" in log and "TCP" not in log for log in logs)
    return root


def assert_records_equal(local_root: Path, jobs_root: Path) -> None:
    for method in METHODS:
        name = f"{method}-seed0.json"
        ran_here, ran_as_job = (json.loads((root / "reports" / "demo" / "runs" / name).read_text())
                                for root in (local_root, jobs_root))
        differing = sorted(k for k in {**ran_here["config"], **ran_as_job["config"]}
                           if ran_here["config"].get(k) != ran_as_job["config"].get(k) and k != "run_dir")
        assert results(ran_as_job) == results(ran_here), (method, "config differs in", differing)
        assert ran_as_job["final"]["student"]["top1"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_executor_jobs_equal_a_local_study_and_resume_after_the_time_limit_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture, local_study: Path) -> None:
    """Training and evaluation as dependent jobs (`--eval-job separate`): CCL's training job is
    stopped by the time-limit warning and resumes; Finetuning's evaluation job is killed, and the
    same command again submits only that evaluation. The records equal a local study's."""
    # Two CPUs per job where the local study gives each notebook one: the demo pins one thread
    # (Preset.threads), so a job must compute exactly as the local study does.
    threads = 2
    jobs = tmp_path / "jobs"
    argv = study_argv(jobs, "--methods", *METHODS, "--launcher", "submitit-local", "--cpus-per-task", str(threads),
                      "--eval-job", "separate")
    assert cli.main(argv) == 0                                   # submits the four jobs and returns
    folder = jobs / "runs" / "demo" / "submitit-local"
    manifest = cluster.read_manifest(folder)
    assert sorted(manifest) == ["CCL-seed0", "CCL-seed0.evaluation", "Finetuning-seed0", "Finetuning-seed0.evaluation"]
    assert [manifest[k].phase for k in sorted(manifest)] == ["train", "evaluate"] * 2

    # Finetuning's evaluation job killed while it waits for its training (the local executor's afterok)
    killed = psutil.Process(int(manifest["Finetuning-seed0.evaluation"].job_id))
    _when(lambda: bool(killed.children()), 120, "the evaluation job's task to start")
    for process in [*killed.children(recursive=True), killed]:
        process.kill()
    killed.wait(30)

    # the warning SLURM sends before a time limit (submitit's USR2), to CCL's job while it trains
    ccl = jobs / "runs" / "demo" / "CCL" / "seed0"
    _when(lambda: _state(ccl) == "running", 300, "CCL to train", lambda: _job_log(jobs, "CCL-seed0"))
    [task] = psutil.Process(int(manifest["CCL-seed0"].job_id)).children()
    task.send_signal(job.preemption_signal())

    # the same command again submits only Finetuning's evaluation, waits for every job, reports
    capsys.readouterr()
    assert cli.main([*argv, "--wait"]) == 0, _job_log(jobs, "CCL-seed0")
    out = capsys.readouterr().out
    assert "1 of 2 (method, seed) to submit with --launcher submitit-local (1 job(s))" in out, out
    again = cluster.read_manifest(folder)
    assert {k: v for k, v in again.items() if k != "Finetuning-seed0.evaluation"} == {
        k: v for k, v in manifest.items() if k != "Finetuning-seed0.evaluation"}
    assert again["Finetuning-seed0.evaluation"].job_id != manifest["Finetuning-seed0.evaluation"].job_id
    trained = (jobs / "runs" / "demo" / "Finetuning" / "seed0" / "train.log").read_text()
    assert "resumed" not in trained and trained.count("task 1 epoch 1:") == 1      # trained once
    log = _job_log(jobs, "CCL-seed0")
    assert "Calling checkpoint method" in log and "Requeued job" in log
    assert "resumed at task" in (ccl / "train.log").read_text()
    assert (jobs / "reports" / "demo" / "index.html").is_file()
    assert_records_equal(local_study, jobs)


def test_an_evaluation_job_merges_the_lincls_evaluations_left_into_one_pass(tmp_path: Path) -> None:
    """Untrained encoders first, then one notebook for every lincls evaluation left (the first
    encoder's parameters, the others as `also`, each resuming its own state), then the records.
    Nothing is merged where the settings differ, a probe is among them, or one is left."""
    def evaluation(group: str, who: str, done: bool = False, **extra: Any) -> study.Step:
        run_dir = tmp_path / group.replace(" ", "-")
        return study.Step(f"{group}: linear eval ({who})", "linear_eval", run_dir / f"linear_eval_{who}.ipynb",
                          {"run_dir": str(run_dir), "who": who, "seed": 0, "protocol": "lincls", "epochs": 2,
                           **extra}, done=done, group=group)

    untrained = study.Step("untrained seed 0: evaluate at initialisation", "untrained", tmp_path / "u" / "config.json",
                           {}, group="untrained seed 0")
    records = [study.Step(f"{g}: record", "record", tmp_path / f"{g}.json", {}, group=g)
               for g in ("CCL seed 0", "untrained seed 0")]
    evaluations = [evaluation("CCL seed 0", "student", done=True), evaluation("CCL seed 0", "teacher"),
                   evaluation("untrained seed 0", "student")]
    merged = job.evaluation_steps([evaluations[0], evaluations[1], records[0], untrained, evaluations[2],
                                   records[1]], tmp_path)
    assert [s.notebook for s in merged] == ["untrained", "linear_eval", "record", "record"]
    one = merged[1]
    assert one.output == tmp_path / "linear_evals_seed0.ipynb" and not one.done
    assert one.label == "seed0: linear evals in one pass (2 encoders: CCL seed 0 teacher, untrained seed 0 student)"
    assert one.parameters == {**evaluations[1].parameters, "resume": "auto",
                              "also": [f"{tmp_path / 'untrained-seed-0'}:student"]}
    for apart in ([evaluations[1], evaluation("untrained seed 0", "student", epochs=3)],
                  [evaluations[1], evaluation("untrained seed 0", "student", protocol="probe")],
                  [evaluations[1]]):
        assert job.evaluation_steps(apart, tmp_path) == apart


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_one_evaluation_job_per_seed_trains_its_classifiers_in_one_pass_and_equals_a_local_study(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--eval-job shared` (the default on several GPUs) under submitit's local executor: two
    training jobs, then one evaluation job for the seed, the untrained baselines included, which
    trains the five lincls classifiers in one pass. Every record equals a local study's, where
    each encoder has its own evaluation. A record lost afterwards costs only that evaluation job."""
    params = [*SMALL, "linear_eval.protocol=lincls", "linear_eval.epochs=2", "linear_eval.schedule=[1]",
              "linear_eval.batch_size=16", "linear_eval.lr=1.0", "linear_eval.workers=0"]

    def argv(root: Path, *extra: str) -> list[str]:
        return ["study", "--preset", "demo", *[x for p in params for x in ("-p", p)], "--seeds", "0",
                "--methods", *METHODS, "--runs-root", str(root / "runs"), "--reports-root", str(root / "reports"),
                *extra]

    local, jobs = tmp_path / "local", tmp_path / "jobs"
    assert cli.main(argv(local)) == 0
    shared = argv(jobs, "--launcher", "submitit-local", "--cpus-per-task", "2", "--eval-job", "shared", "--wait")
    assert cli.main(shared) == 0
    manifest = cluster.read_manifest(jobs / "runs" / "demo" / "submitit-local")
    keys = [f"{m}-seed0" for m in ("CCL", "Finetuning", "untrained", "untrained-bn")]
    assert sorted(manifest) == sorted([*keys[:2], *(f"{k}.evaluation" for k in keys)])
    assert len({manifest[f"{k}.evaluation"].job_id for k in keys}) == 1          # one job for the seed
    merged = (jobs / "runs" / "demo" / "linear_evals_seed0.log").read_text()
    assert "Executing Cell" in merged
    names = [f"{k}.json" for k in keys]
    for name in names:
        here, as_job = (json.loads((root / "reports" / "demo" / "runs" / name).read_text()) for root in (local, jobs))
        assert results(as_job) == results(here), name
        assert set(as_job["final"]) == ({"student", "teacher"} if name.startswith("CCL") else {"student"})

    # CCL's record and its teacher's result lost: the same command submits that evaluation alone
    (jobs / "reports" / "demo" / "runs" / "CCL-seed0.json").unlink()
    (jobs / "runs" / "demo" / "CCL" / "seed0" / "lincls_teacher.json").unlink()
    capsys.readouterr()
    assert cli.main(shared) == 0
    out = capsys.readouterr().out
    assert "1 of 4 (method, seed) to submit with --launcher submitit-local (1 job(s))" in out, out
    assert "CCL seed 0: trained in" in out
    assert (jobs / "runs" / "demo" / "CCL" / "seed0" / "train.log").read_text().count("task 1 epoch 1:") == 1
    here, again = (json.loads((root / "reports" / "demo" / "runs" / "CCL-seed0.json").read_text())
                   for root in (local, jobs))
    assert results(again) == results(here)


@pytest.mark.slow
def test_a_requeued_evaluation_job_continues_its_linear_evaluation_exactly(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped evaluation job leaves `lincls_<who>.pt` from its last finished epoch; requeued, it
    passes that state to the notebook (`resume`), and the evaluation ends as an uninterrupted one."""
    import cclnb.evaluate.lincls as lincls
    from test_lincls import _checkpoint

    ckpt = tmp_path / "ckpt.pt"
    _checkpoint(ckpt)
    argv = ["lincls", "--data", "demo", "--pretrained", str(ckpt), "-a", "resnet18", "--stem", "imagenet",
            "--subset-per-class", "4", "--epochs", "2", "--schedule", "1", "-b", "16", "--lr", "1",
            "--device", "cpu", "--precision", "fp32", "--no-progress"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    stopped.mkdir()
    save = lincls.write_atomically

    def keep_first_epoch(state: dict, path: Path, what: str) -> None:   # what a stop in epoch 2 leaves
        save(state, path, what)
        if state["epoch"] == 1:
            shutil.copy(path, stopped / "lincls_student.pt")

    monkeypatch.setattr(lincls, "write_atomically", keep_first_epoch)
    assert cli.main([*argv, "--out", str(full)]) == 0
    monkeypatch.undo()

    steps = [study.Step("X seed 0: linear eval (student)", "linear_eval", stopped / "linear_eval_student.ipynb",
                        {"run_dir": str(stopped), "who": "student"}),
             study.Step("X seed 0: linear eval (teacher)", "linear_eval", stopped / "linear_eval_teacher.ipynb",
                        {"run_dir": str(stopped), "who": "teacher"})]
    job.resume_linear_evals(steps)
    assert steps[0].parameters["resume"] == str(stopped / "lincls_student.pt")
    assert "resume" not in steps[1].parameters                        # no state: it starts from epoch 0
    assert cli.main([*argv, "--out", str(stopped), "--resume", steps[0].parameters["resume"]]) == 0
    resumed, uninterrupted = (json.loads((d / "lincls_student.json").read_text()) for d in (stopped, full))
    assert len(uninterrupted["curve"]) == 2
    assert resumed["curve"] == uninterrupted["curve"] and resumed["top1"] == uninterrupted["top1"]


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


# ----------------------------------------------------------------------------- a real scheduler
SLURM_SCRIPT = REPO.parent / "shared" / "tools" / "slurm-single-node.sh"


def _sinfo_answers() -> bool:
    """Whether a SLURM controller answers here with a node ready for jobs."""
    if shutil.which("sinfo") is None:
        return False
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (subprocess.SubprocessError, OSError):
        return False
    return done.returncode == 0 and bool(re.search(r"^(idle|mix|alloc)", done.stdout, re.M))


@pytest.fixture(scope="module")
def real_slurm() -> Iterator[None]:
    """A one-node SLURM cluster on this machine (Debian's slurm-wlm and munge, started by
    ../shared/tools/slurm-single-node.sh as root, partition `debug`), stopped after the module
    when this fixture started it; the test is skipped, saying why, where that cannot run."""
    if _sinfo_answers():
        yield
        return
    if not SLURM_SCRIPT.is_file():
        pytest.skip(f"no real SLURM: {SLURM_SCRIPT} (beside the checkout, in ../shared/tools) is not here")
    if os.geteuid() != 0:
        pytest.skip(f"no real SLURM: {SLURM_SCRIPT.name} installs and starts SLURM as root; run the tests as root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("no real SLURM: slurm-wlm is not installed and there is no apt-get to install it")
    started = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        tail = (started.stdout + started.stderr).strip().splitlines()[-3:]
        pytest.skip(f"no real SLURM: {SLURM_SCRIPT.name} start exited {started.returncode}: {' | '.join(tail)}")
    try:
        yield
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_slurm_dependent_jobs_and_a_preempted_training_equal_a_local_study(
        tmp_path: Path, local_study: Path, real_slurm: None) -> None:
    """What a new user does on a cluster, against a real scheduler: the demo grid as training
    jobs and the seed's one evaluation job held by `afterok` on both (the default layout on
    several GPUs); CCL's training preempted as SLURM does it (USR2 to every process of the job),
    requeued and resumed; the records equal a local study's."""
    jobs = tmp_path / "jobs"
    argv = study_argv(jobs, "--methods", *METHODS, "--launcher", "slurm", "--partition", "debug",
                      "--assume-shared-fs", "--eval-job", "shared", "--cpus-per-task", "1", "--mem-gb", "2")
    assert cli.main(argv) == 0
    manifest = cluster.read_manifest(jobs / "runs" / "demo" / "slurm")
    assert sorted(manifest) == ["CCL-seed0", "CCL-seed0.evaluation", "Finetuning-seed0", "Finetuning-seed0.evaluation"]
    assert manifest["CCL-seed0.evaluation"] == manifest["Finetuning-seed0.evaluation"]          # one job for the seed
    reason = subprocess.run(["squeue", "-h", "-j", manifest["CCL-seed0.evaluation"].job_id, "-o", "%r"],
                            capture_output=True, text=True, timeout=60).stdout
    assert "Dependency" in reason, reason                          # held until its training succeeded

    ccl = jobs / "runs" / "demo" / "CCL" / "seed0"
    _when(lambda: _state(ccl) == "running", 900, "CCL to train", lambda: _job_log(jobs, "CCL-seed0", "slurm"))
    subprocess.run(["scancel", "--signal=USR2", "--full", manifest["CCL-seed0"].job_id], check=True, timeout=60)

    assert cli.main([*argv, "--wait"]) == 0, _job_log(jobs, "CCL-seed0", "slurm")
    assert cluster.read_manifest(jobs / "runs" / "demo" / "slurm") == manifest      # nothing resubmitted
    assert "Requeued job" in _job_log(jobs, "CCL-seed0", "slurm")
    assert "resumed at task" in (ccl / "train.log").read_text()
    assert_records_equal(local_study, jobs)
