"""The bad-input catalogue (docs/reliability.md): every row runs the real command line and checks
the exit code and that the message names the problem *and* the fix.

Each row is (command line, exit code, problem, fix), the last two regular expressions the
message must contain. Rows that need an earlier run share one tiny finished SimpleReplay run,
whose files must come out of every refused command untouched: a failed command never costs work
already done.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from cclnb.commands import cli
from cclnb.errors import CheckpointError, ConfigError, DataError, StudyBusy
from conftest import study_cli, write_image_folder
from test_slurm import fake_slurm

# every train row passes --run-dir under tmp_path: a refused run must not leave runs/ in the checkout
TINY = ["-a", "resnet18", "--stem", "imagenet", "--epochs", "1", "-b", "16", "--moco-k", "64",
        "--n-tasks", "2", "--subset-per-class", "10", "--seed", "0", "--eval-each-task", "none",
        "--device", "cpu", "--no-progress", "--key-bn-groups", "4", "--bn-groups", "2"]
FINISHED = ["train", "--data", "demo", *TINY, "--method", "SimpleReplay", "--n-save", "12"]
LINCLS = ["lincls", "--data", "demo", "-a", "resnet18", "--stem", "imagenet", "--epochs", "1",
          "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="session")
def finished(tmp_cache_dir: Path) -> Path:
    """A complete two-task run, built once per test session and shared by the xdist workers (the
    first one builds it under a lock; the rows only read it). n_save 12 keeps 12 * 5 = 60 ids of
    50-image tasks: with replacement (the authors' draw) that works and train.log says so."""
    run = tmp_cache_dir.parent / "catalogue-finished-run"
    with open(tmp_cache_dir.parent / "catalogue-finished.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status = run / "status.json"
        if not (status.is_file() and json.loads(status.read_text())["state"] == "complete"):
            shutil.rmtree(run, ignore_errors=True)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert cli.main([*FINISHED, "--run-dir", str(run)]) == 0
            finally:
                torch.set_num_threads(threads)
    return run


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mtime, content hash of small files) of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest() if p.stat().st_size < 2**20 else "")
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- inputs to build
def page_naming_a_study_without_records(tmp: Path, run: Path) -> str:
    page = tmp / "page.md"
    page.write_text("<!-- cclnb:summary nope -->\n<!-- /cclnb -->\n")
    (tmp / "reports").mkdir()
    return str(page)


def not_a_dataset_zip(tmp: Path, run: Path) -> str:
    path = tmp / "notes.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme/notes.txt", "no images here")
    return str(path)


def plain_file(tmp: Path, run: Path) -> str:
    path = tmp / "notes.txt"
    path.write_text("no images here")
    return str(path)


def corrupt_image_folder(tmp: Path, run: Path) -> str:
    folder = write_image_folder(tmp / "data", n_classes=2, per_class=20, ext=".jpg")
    victim = folder / "train" / "class_1" / "img_13.jpg"
    victim.write_bytes(victim.read_bytes()[:300])          # the header survives, the data does not
    return str(folder)


def under_a_file(tmp: Path, run: Path) -> str:
    """A folder that cannot be created: its parent is a regular file. (Tests run as root, where
    chmod does not stop writes, and a read-only bind mount needs privileges CI lacks.)"""
    blocker = tmp / "a_file"
    blocker.write_text("x")
    return str(blocker / "out")


def finished_study(tmp: Path, *argv: str) -> list[str]:
    """`cclnb study --preset demo --methods Joint --seeds 0 ARGV` over a finished study of those
    runs (written as the trainer leaves them, `test_rerun.finish`)."""
    from cclnb import study
    from test_rerun import finish

    finish(study.plan_study("demo", runs_root=tmp / "runs", reports_root=tmp / "reports", methods=["Joint"], seeds=[0]))
    return study_cli(tmp, "--preset", "demo", "--methods", "Joint", "--seeds", "0", *argv)


_HELD: list = []   # study locks held by this process for the rows that need a running study


@pytest.fixture(scope="module", autouse=True)
def _release_held_locks():
    yield
    while _HELD:
        _HELD.pop().__exit__(None, None, None)


def running_study(tmp: Path, *argv: str) -> list[str]:
    """`cclnb study --preset demo ARGV` while this process holds the study's lock, as a running
    `cclnb study` of it does."""
    from cclnb.study.lock import study_lock

    held = study_lock(tmp / "runs" / "demo", lambda line: None)
    held.__enter__()
    _HELD.append(held)
    return study_cli(tmp, "--preset", "demo", *argv)


def run_copy_with(last_pt: Callable[[Path, Path], None]) -> Callable[[Path, Path], str]:
    """A copy of the finished run's small files, marked interrupted (so --resume would continue),
    whose checkpoints/last.pt is written by `last_pt(path, the finished run's last.pt)`."""
    def build(tmp: Path, run: Path) -> str:
        copy = tmp / "copy"
        (copy / "checkpoints").mkdir(parents=True)
        for name in ("config.json", "train.log", "train_log.csv"):
            shutil.copy(run / name, copy / name)
        (copy / "status.json").write_text(json.dumps({"state": "interrupted", "task": 1}))
        last_pt(copy / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
        return str(copy)
    return build


def truncated(path: Path, real: Path) -> None:
    path.write_bytes(real.read_bytes()[:100_000])


def random_bytes(path: Path, real: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def foreign(path: Path, real: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, path)       # a loadable file, but not cclnb's


class Gadget:
    """What a malicious pickle would carry: weights_only=True must refuse to build it."""


def with_code(path: Path, real: Path) -> None:
    torch.save({"format": "cclnb-checkpoint-v1", "payload": Gadget()}, path)


def checkpoint_file(last_pt: Callable[[Path, Path], None]) -> Callable[[Path, Path], str]:
    def build(tmp: Path, run: Path) -> str:
        path = tmp / "model.pt"
        last_pt(path, run / "checkpoints" / "last.pt")
        return str(path)
    return build


# ----------------------------------------------------------------------------- the catalogue
@dataclass
class Row:
    id: str
    argv: Callable[[Path, Path], list[str]]     # (tmp_path, finished run) -> command line
    code: int
    problem: str                                # regex: what is wrong (and where)
    fix: str                                    # regex: what to do
    env: Callable[[Path], dict[str, str]] | None = None   # tmp_path -> environment (a fake SLURM)


def _row(id: str, argv, code: int, problem: str, fix: str, env=None) -> pytest.param:
    return pytest.param(Row(id, argv, code, problem, fix, env), id=id)


def with_sinfo(t: Path) -> dict[str, str]:
    """A SLURM whose sinfo lists `cpu` (the default, no GPU) and `gpu` (nodes of 4 and of 8 GPUs)."""
    return {"PATH": fake_slurm(t / "bin")}


CATALOGUE = [
    _row("wrong data path", lambda t, r: ["train", "--data", str(t / "no" / "such"), *TINY, "--run-dir", str(t / "run")],
         DataError.exit_code, r"dataset path .*no/such does not exist", r"check --data"),
    _row("zip without images", lambda t, r: ["data", "info", not_a_dataset_zip(t, r)],
         DataError.exit_code, r"notes.zip has no 'train/' folder .*top level holds: readme",
         r"expected \[<top>/\]train/<class>/<image>"),
    _row("file that is not a zip", lambda t, r: ["train", "--data", plain_file(t, r), *TINY, "--run-dir", str(t / "run")],
         DataError.exit_code, r"notes.txt is a file but not a zip archive", r"pass a dataset folder"),
    _row("corrupt image", lambda t, r: ["train", "--data", corrupt_image_folder(t, r), *TINY, "--run-dir", str(t / "run")],
         DataError.exit_code, r"cannot decode image .*class_1/img_13\.jpg", r"(replace|remove|delete)"),
    _row("classes not divisible by tasks", lambda t, r: ["train", "--data", "demo", *TINY, "--n-tasks", "3", "--run-dir", str(t / "run")],
         ConfigError.exit_code, r"10 classes cannot be split into 3 equal tasks",
         r"choose --n-tasks from 1, 2, 5, 10"),
    _row("classes not divisible (data info)", lambda t, r: ["data", "info", "demo", "--n-tasks", "4"],
         ConfigError.exit_code, r"10 classes cannot be split into 4 equal tasks", r"choose --n-tasks from"),
    _row("n_save beyond a task, without replacement",
         lambda t, r: ["train", "--data", "demo", *TINY, "--method", "SimpleReplay", "--n-save", "12",
                       "--replay-without-replacement", "--run-dir", str(t / "run")],
         ConfigError.exit_code, r"keeps n_save \* C/n = 60 distinct images .* task 0 has only 50",
         r"lower --n-save to at most 10 or drop --replay-without-replacement"),
    _row("class range beyond the data",
         lambda t, r: ["train", "--data", str(write_image_folder(t / "data", n_classes=2)), *TINY, "--classes", "2-5",
                       "--run-dir", str(t / "run")],
         ConfigError.exit_code, r"--classes 2-5 reaches class 5, but .*data/train/ has 2 classes",
         r"choose a range within 1-2"),
    _row("class range that is not FIRST-LAST",
         lambda t, r: ["train", "--data", "demo", *TINY, "--classes", "101:200", "--run-dir", str(t / "run")],
         ConfigError.exit_code, r"--classes '101:200': write FIRST-LAST",
         r"positions in the sorted class order counted from 1, both included \(e\.g\. --classes 101-200"),
    _row("unknown method", lambda t, r: ["train", "--data", "demo", "--method", "MoCo"],
         ConfigError.exit_code, r"unknown method 'MoCo'", r"choose one of Finetuning, SimpleReplay, CCL.*--method-module"),
    _row("unknown architecture", lambda t, r: ["train", "--data", "demo", "-a", "resnet9"],
         2, r"argument -a/--arch: invalid choice: 'resnet9'", r"choose from 'resnet18'"),
    _row("unknown architecture (lincls)", lambda t, r: ["lincls", "--data", "demo", "-a", "vgg16"],
         2, r"argument -a/--arch: invalid choice: 'vgg16'", r"choose from 'resnet18'"),
    _row("unknown notebook parameter",
         lambda t, r: ["study", "--preset", "demo", "-p", "epochz=1", "--runs-root", str(t / "runs")],
         ConfigError.exit_code, r"unknown parameter 'epochz'", r"valid names are .*epochs"),
    _row("study: a parameter of the wrong type", lambda t, r: study_cli(t, "--preset", "demo", "-p", "lr=fast"),
         ConfigError.exit_code, r"-p lr='fast': expected float", r"\(the preset demo has 0\.1\)"),
    _row("study: parameter out of range", lambda t, r: study_cli(t, "--preset", "demo", "-p", "epochs=0"),
         ConfigError.exit_code, r"Finetuning seed 0: task sequence \(and 17 more runs\): --epochs must be >= 1, got 0",
         r"-p epochs=.*checked before any step started; nothing was written"),
    _row("study: GPU preset where there is none",
         lambda t, r: study_cli(t, "--preset", "tin100-32", "-p", "data=demo", "-p", "dataset=demo"),
         ConfigError.exit_code, r"ask for device=cuda, but no CUDA GPU is visible",
         r"add -p device=cpu -p linear_eval.device=cpu \(or auto\)"),
    _row("study: missing records folder", lambda t, r: study_cli(t, "--preset", "demo", "--records",
                                                                  str(t / "nonexistent"), "--report-only"),
         DataError.exit_code, r"--records .*/nonexistent: no such folder", r"check the path .* or drop that --records"),
    _row("study: output folder not writable",
         lambda t, r: ["study", "--preset", "demo", "--runs-root", under_a_file(t, r), "--reports-root", str(t / "rep")],
         ConfigError.exit_code, r"output folder .*a_file/out/demo is not writable", r"choose another one with --runs-root"),
    _row("study: data the preset's dataset ignores", lambda t, r: study_cli(t, "--preset", "demo", "-p", "data=/nonexistent.zip"),
         ConfigError.exit_code, r"-p data=/nonexistent.zip is not read: the study's dataset is 'demo' \(the embedded shapes",
         r"add -p dataset=auto \(or zip, imagefolder, cifar10, cifar100\), or drop -p data"),
    _row("study: a rerun with other parameters", lambda t, r: finished_study(t, "-p", "lr=0.05"),
         ConfigError.exit_code, r"3 finished runs of study 'demo' were made with other parameters than this command's: "
         r"Joint seed 0, untrained seed 0, untrained-bn seed 0: lr: they have 0.1, this command 0.05\. Nothing was run",
         r"give this command's runs another --study NAME; to replace them, add --rerun-changed \(the old runs and "
         r"their records move to .*runs/demo/\.replaced\)"),
    _row("study: a second command on a running study", lambda t, r: running_study(t, "--methods", "Joint", "--seeds", "0"),
         StudyBusy.exit_code, r"study 'demo' is running: PID \d+ on host \S+ \(started .*\) holds .*runs/demo/study\.lock",
         r"wait for it to end, or stop it first \(cclnb study \.\.\. --status shows where it stands\); nothing was run"),
    _row("study: a name that is not one folder", lambda t, r: study_cli(t, "--preset", "demo", "--study", "../../escape"),
         ConfigError.exit_code, r"--study '\.\./\.\./escape': a study name is one folder name under --runs-root and "
         r"--reports-root", r"letters, digits and \. _ - \(not first\), e\.g\. --study demo-lr0\.05"),
    _row("resume with another configuration",
         lambda t, r: [*FINISHED[:-4], "--method", "CCL", "--n-save", "12", "--resume", str(r)],
         CheckpointError.exit_code, r"cannot resume .*run with a different configuration: method: run has "
         r"'SimpleReplay', now 'CCL'", r"Pass the original options \(see its config.json\) or start a new run"),
    _row("new run over a finished one", lambda t, r: [*FINISHED, "--run-dir", str(r)],
         ConfigError.exit_code, r"run directory .*run already holds a run \(complete\) with checkpoints",
         r"continue it with --resume .*or choose another --run-dir"),
    _row("GPU requested where there is none", lambda t, r: ["train", "--data", "demo", *TINY, "--device", "cuda", "--run-dir", str(t / "run")],
         ConfigError.exit_code, r"--device cuda was requested but no CUDA GPU is visible", r"use --device cpu"),
    _row("GPU requested where there is none (lincls)", lambda t, r: [*LINCLS, "--device", "cuda"],
         ConfigError.exit_code, r"--device cuda was requested but no CUDA GPU is visible", r"use --device cpu"),
    _row("prefetch on a CPU", lambda t, r: ["train", "--data", "demo", *TINY, "--prefetch", "--run-dir", str(t / "run")],
         ConfigError.exit_code, r"--prefetch overlaps the next batch's augmentation with the step on a second CUDA stream; "
         r"on a CPU there is nothing to overlap with", r"drop --prefetch, or train on a GPU"),
    _row("prefetch with the worker loader",
         lambda t, r: ["train", "--data", "demo", *TINY, "--prefetch", "--loader", "workers", "--run-dir", str(t / "run")],
         ConfigError.exit_code, r"--prefetch builds batches on the device, which --loader workers does not",
         r"use --loader tensor or --loader decode, or drop --prefetch"),
    _row("device decode of decoded pixels",
         lambda t, r: ["train", "--data", "demo", *TINY, "--loader", "decode", "--run-dir", str(t / "run")],
         DataError.exit_code, r"--loader decode decodes image files on the device, but demo-shapes \(demo\) holds "
         r"decoded pixels, not files", r"use --loader tensor \(or auto\) for it"),
    _row("output folder not writable", lambda t, r: ["train", "--data", "demo", *TINY, "--run-dir", under_a_file(t, r)],
         ConfigError.exit_code, r"run directory .*a_file/out is not writable", r"choose another one with --run-dir"),
    _row("resume: truncated checkpoint", lambda t, r: [*FINISHED, "--resume", run_copy_with(truncated)(t, r)],
         CheckpointError.exit_code, r"copy/checkpoints/last.pt is truncated or corrupt",
         r"resume from an earlier checkpoint"),
    _row("resume: corrupt checkpoint", lambda t, r: [*FINISHED, "--resume", run_copy_with(random_bytes)(t, r)],
         CheckpointError.exit_code, r"copy/checkpoints/last.pt is (truncated or corrupt|not a cclnb checkpoint)",
         r"(resume from an earlier checkpoint|pass a checkpoint written by cclnb)"),
    _row("resume: foreign checkpoint", lambda t, r: [*FINISHED, "--resume", run_copy_with(foreign)(t, r)],
         CheckpointError.exit_code, r"copy/checkpoints/last.pt is not a cclnb checkpoint \(no 'format' entry\)",
         r"pass a file from <run-dir>/checkpoints/"),
    _row("resume: checkpoint that would run code", lambda t, r: [*FINISHED, "--resume", run_copy_with(with_code)(t, r)],
         CheckpointError.exit_code, r"copy/checkpoints/last.pt is not a cclnb checkpoint: .*was not loaded",
         r"pass a checkpoint written by cclnb"),
    _row("lincls: truncated checkpoint", lambda t, r: [*LINCLS, "--pretrained", checkpoint_file(truncated)(t, r)],
         CheckpointError.exit_code, r"model.pt is truncated or corrupt", r"rerun"),
    _row("lincls: foreign checkpoint", lambda t, r: [*LINCLS, "--pretrained", checkpoint_file(foreign)(t, r)],
         CheckpointError.exit_code, r"model.pt is neither a cclnb checkpoint .* nor the authors'",
         r"pass a checkpoint of a pretraining run"),
    _row("lincls: checkpoint that would run code", lambda t, r: [*LINCLS, "--pretrained", checkpoint_file(with_code)(t, r)],
         CheckpointError.exit_code, r"model.pt is not a cclnb checkpoint: .*was not loaded",
         r"pass a checkpoint written by cclnb"),
    _row("lincls: output folder not writable",
         lambda t, r: [*LINCLS, "--pretrained", str(r), "--out", under_a_file(t, r), "--subset-per-class", "2"],
         ConfigError.exit_code, r"output folder .*a_file/out is not writable", r"choose another one with --out"),
    _row("report tables: a marker naming a study without records",
         lambda t, r: ["report", "tables", page_naming_a_study_without_records(t, r), "--reports-root", str(t / "reports")],
         DataError.exit_code, r"a table names study 'nope', but .*reports/nope/runs holds no records",
         r"fix the marker's study name or commit the study's records"),
    # cclnb study --launcher slurm: refused before anything is submitted (docs/study.md)
    _row("unknown SLURM partition",
         lambda t, r: study_cli(t, "--preset", "demo", "--launcher", "slurm", "--partition", "gpux", "--dry-run"),
         ConfigError.exit_code, r"partition 'gpux' is not on this cluster \(sinfo lists: cpu, gpu\)",
         r"choose one of them with --partition", env=with_sinfo),
    _row("GPU preset on a CPU-only allocation",
         lambda t, r: study_cli(t, "--preset", "tin100-32", "--launcher", "slurm", "--gpus-per-node", "0",
                                "--dry-run", "-p", "data=demo", "-p", "dataset=demo"),
         ConfigError.exit_code, r"preset 'tin100-32' runs linear_eval and task_sequence on device cuda, but the "
         r"job asks for no GPU \(--gpus-per-node 0\)", r"Ask for GPUs with --gpus-per-node N", env=with_sinfo),
    _row("more GPUs than the partition's nodes hold",
         lambda t, r: study_cli(t, "--preset", "demo", "--launcher", "slurm", "--partition", "gpu", "--gpus-per-node",
                                "16", "-p", "batch_size=64", "-p", "bn_groups=16", "-p", "key_bn_groups=16", "--dry-run"),
         ConfigError.exit_code, r"partition 'gpu' has nodes with at most 8 GPU\(s\), but the job asks for 16",
         r"choose a partition with them .* or lower --gpus-per-node", env=with_sinfo),
    _row("run and record folders not shared with the nodes",
         lambda t, r: study_cli(t, "--preset", "demo", "--launcher", "slurm", "--dry-run"),
         ConfigError.exit_code, r"the runs root .* is (under /|on a local).*the compute nodes do not share it",
         r"Put --runs-root and --reports-root on the cluster's shared file system .* or pass --assume-shared-fs",
         env=with_sinfo),
    _row("no SLURM on this machine", lambda t, r: study_cli(t, "--preset", "demo", "--launcher", "slurm"),
         ConfigError.exit_code, r"SLURM is not reachable from here \(no sinfo on PATH\)",
         r"run on the cluster's login node, use --dry-run .*or --launcher submitit-local",
         env=lambda t: {"PATH": str(t / "no-slurm")}),
    _row("a batch that does not split over the job's processes",
         lambda t, r: study_cli(t, "--preset", "demo", "--launcher", "slurm", "--partition", "gpu", "--gpus-per-node",
                                "3", "-p", "device=cuda", "--dry-run"),
         ConfigError.exit_code, r"1 node\(s\) x 3 GPU\(s\) train in 3 processes: --batch-size 32 is the global "
         r"batch and must be divisible by the 3 processes", r"choose a multiple of 3 .*change --gpus-per-node",
         env=with_sinfo),
    _row("--jobs with a cluster launcher",
         lambda t, r: study_cli(t, "--preset", "demo", "--launcher", "submitit-local", "--jobs", "2"),
         ConfigError.exit_code, r"--jobs sets how many runs proceed at once on this machine; with --launcher "
         r"submitit-local the scheduler runs the jobs", r"drop --jobs"),
    _row("a throughput the cost estimate cannot read",
         lambda t, r: study_cli(t, "--preset", "demo", "--launcher", "slurm", "--dry-run", "--throughput", "train=fast"),
         ConfigError.exit_code, r"--throughput 'train=fast': write KIND=IMAGES_PER_S or KIND=LOW-HIGH per GPU",
         r"KIND one of train, train_teacher, features, lincls, forward \(e.g. --throughput train=1500\)", env=with_sinfo),
    _row("a cluster option without a cluster launcher",
         lambda t, r: study_cli(t, "--preset", "demo", "--partition", "gpu"),
         ConfigError.exit_code, r"--partition apply to a cluster launcher", r"add --launcher slurm"),
]


@pytest.mark.parametrize("row", CATALOGUE)
def test_catalogue_row(row: Row, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    if "GPU requested" in row.id and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for name, value in (row.env(tmp_path) if row.env else {}).items():
        monkeypatch.setenv(name, value)
    before = snapshot(finished)
    argv = row.argv(tmp_path, finished)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:            # argparse's own errors (choices) exit directly
        code = exit_.code
    message = capsys.readouterr().err
    assert code == row.code, message
    assert message.count("error:") >= 1 and "Traceback" not in message
    assert re.search(row.problem, message), f"problem not named: {message}"
    assert re.search(row.fix, message), f"fix not named: {message}"
    assert snapshot(finished) == before, "a refused command changed the earlier run's files"


REFUSED_BEFORE_THE_RUN_DIRECTORY = ("prefetch on a CPU", "prefetch with the worker loader",
                                    "device decode of decoded pixels", "class range beyond the data",
                                    "class range that is not FIRST-LAST")


@pytest.mark.parametrize("row", [p for p in CATALOGUE if p.id in REFUSED_BEFORE_THE_RUN_DIRECTORY])
def test_a_refused_loader_or_class_option_writes_no_run_directory(row: Row, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """The loader options and the class range are checked before the run directory is made
    (before, a refused loader option left config.json and status.json behind)."""
    assert cli.main(row.argv(tmp_path, tmp_path / "unused")) == row.code, capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_n_save_beyond_a_task_with_replacement_is_logged(finished: Path) -> None:
    """The authors' draw with replacement keeps 60 ids of a 50-image task: allowed, and said."""
    log = (finished / "train.log").read_text()
    assert "replay: task 0 has 50 images but n_save*C/n = 60 are kept; drawing with replacement" in log
    ids = json.loads((finished / "replay" / "task_0.json").read_text())["ids"]
    assert len(ids) == 60 and len(set(ids)) < 60
