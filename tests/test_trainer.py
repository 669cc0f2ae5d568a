"""End-to-end trainer tests on the CPU: every method over two tasks, the run directory, the command
line, and the bad inputs the trainer owns. Sizes are tiny (ResNet-18 with the ImageNet stem at
32 px, a few images per class, one epoch) so the whole file runs in well under a minute."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cclnb import train
from cclnb.commands.cli import build_parser
from cclnb.commands.train import config_from_args
from cclnb.config import TrainConfig
from cclnb.errors import CheckpointError, ConfigError, TrainingDiverged

SUB100 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tiny-imagenet-32-sub100.zip"


@pytest.fixture(autouse=True)
def one_thread():
    """Two xdist workers on two cores: one BLAS thread each avoids oversubscription (10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(tmp_path: Path, method: str = "CCL", **overrides) -> TrainConfig:
    """A two-task run that takes seconds on one CPU core."""
    values = dict(data="demo", arch="resnet18", stem="imagenet", epochs=1, batch_size=16, moco_k=64,
                  ccl_k=16, n_tasks=2, n_save=2, method=method, subset_per_class=10, seed=0,
                  workers=0, progress=False, eval_each_task="none", key_bn_groups=4,
                  bn_groups=2, run_dir=str(tmp_path / "run"), device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", ["Finetuning", "SimpleReplay", "CCL", "Joint"])
def test_each_method_two_tasks_on_sub100_leaves_a_complete_run_dir(tmp_path, method):
    if not SUB100.is_file():
        pytest.skip(f"{SUB100} is absent (the shared tiny-imagenet-32-sub100 zip is needed)")
    config = tiny_config(tmp_path, method, data=str(SUB100), subset_per_class=3, batch_size=32,
                         n_save=1, eval_each_task="knn", knn_k=5,
                         ccl_k=32, moco_k=128, key_bn_groups=8)
    run = train(config)
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    saved = json.loads((run / "config.json").read_text())
    for key in ("git_commit", "versions", "hardware", "started"):
        assert key in saved
    assert saved["image_size"] == 32 and saved["loader"] == "tensor" and saved["method"] == method
    n_rows = 1 if method == "Joint" else 2
    log = read_csv(run / "train_log.csv")
    assert {int(r["task"]) for r in log} == set(range(n_rows))
    assert all(np.isfinite(float(r["loss"])) for r in log)
    acc = read_csv(run / "eval" / "acc_knn_student.csv")
    assert [int(r["after_task"]) for r in acc] == list(range(n_rows))
    assert set(acc[0]) == {"after_task", "task_0", "task_1", "all"}
    for t in range(n_rows):
        replay = json.loads((run / "replay" / f"task_{t}.json").read_text())
        budget = 1 * 50    # n_save * C/n = 1 * 100/2
        if method == "SimpleReplay":
            assert len(replay["ids"]) == budget and replay["selection"] == "random"
        elif method == "CCL":
            assert 0 < len(replay["ids"]) <= budget and replay["selection"] == "min_var"
        else:
            assert replay["ids"] == [] and replay["selection"] == "none"
        assert load_ckpt(run / "checkpoints" / f"task_{t}.pt")["task"] == t + 1
    last = load_ckpt(run / "checkpoints" / "last.pt")
    assert last["task"] == n_rows and len(last["replay"]) == n_rows
    assert (last["teacher"] is not None) == (method == "CCL")


def test_ccl_in_bf16_with_teacher_evaluation(tmp_path):
    run = train(tiny_config(tmp_path, "CCL", precision="bf16", eval_each_task="knn", eval_teacher=True,
                            knn_k=5))
    student = read_csv(run / "eval" / "acc_knn_student.csv")
    teacher = read_csv(run / "eval" / "acc_knn_teacher.csv")
    assert len(student) == len(teacher) == 2
    assert student[0] == teacher[0]            # after task 0 the teacher is the student
    assert all(np.isfinite(float(r["loss"])) for r in read_csv(run / "train_log.csv"))


def test_cli_maps_the_authors_command_line(tmp_path):
    argv = ["train", "-a", "resnet18", "--lr", "0.06", "-b", "64", "--mlp", "--moco-t", "0.2",
            "--aug-plus", "--cos", "--epochs", "3", "--method", "CLL", "--n_tasks", "5", "--n_save", "7",
            "--wd", "5e-4", "-j", "4", "--imagenetsub", "--no-ccl-extra-queue", "--ccl-distill-group", "0",
            "--dist-url", "tcp://localhost:10001", "--world-size", "1", "--rank", "0", "DATA_DIR"]
    config = config_from_args(build_parser("train").parse_args(argv))
    assert (config.arch, config.lr, config.batch_size, config.mlp, config.moco_t) == ("resnet18", 0.06, 64, True, 0.2)
    assert (config.aug_plus, config.cos, config.epochs, config.method) == (True, True, 3, "CCL")
    assert (config.n_tasks, config.n_save, config.weight_decay, config.workers) == (5, 7, 5e-4, 4)
    assert config.imagenetsub and not config.ccl_extra_queue and config.ccl_distill_group == 0
    assert config.data == "DATA_DIR"
    defaults = config_from_args(build_parser("train").parse_args(["train", "--data", "x"]))
    assert defaults.to_dict() == TrainConfig(data="x").to_dict()
    with pytest.raises(ConfigError, match="two datasets"):
        config_from_args(build_parser("train").parse_args(["train", "--data", "a", "b"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_gpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train(tiny_config(tmp_path, device="cuda"))


def test_unwritable_run_dir_is_a_config_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        train(tiny_config(tmp_path, run_dir=str(blocker / "run")))


def test_batch_larger_than_a_task_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(tiny_config(tmp_path, batch_size=64))


def test_n_save_beyond_the_task_draws_duplicates_and_says_so(tmp_path):
    run = train(tiny_config(tmp_path, "SimpleReplay", n_save=12))   # 12 * 5 = 60 > 50 images
    ids = json.loads((run / "replay" / "task_0.json").read_text())["ids"]
    assert len(ids) == 60 and len(set(ids)) < 60
    assert "drawing with replacement" in (run / "train.log").read_text()
    with pytest.raises(ConfigError, match="distinct"):
        train(tiny_config(tmp_path, "SimpleReplay", n_save=12, replay_with_replacement=False,
                          run_dir=str(tmp_path / "run2")))


def test_nan_loss_stops_with_task_epoch_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import cclnb.training.loop as trainer_module

    calls = {"n": 0}
    real = trainer_module.info_nce_from_logits

    def poisoned(logits):
        calls["n"] += 1
        loss = real(logits)
        return loss * float("nan") if calls["n"] == 5 else loss   # task 1 (3 steps per task), step 1

    monkeypatch.setattr(trainer_module, "info_nce_from_logits", poisoned)
    config = tiny_config(tmp_path, "Finetuning")
    with pytest.raises(TrainingDiverged, match="task 1, epoch 0, step 1"):
        train(config)
    run = Path(config.run_dir)
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert load_ckpt(run / "checkpoints" / "last.pt")["task"] == 1    # the good end of task 0


def test_resume_refuses_another_configuration_and_a_complete_run_is_a_no_op(tmp_path, capsys):
    config = tiny_config(tmp_path, "Finetuning")
    run = train(config)
    before = (run / "checkpoints" / "last.pt").stat().st_mtime_ns
    with pytest.raises(CheckpointError, match="method: run has 'Finetuning', now 'CCL'"):
        train(tiny_config(tmp_path, "CCL", resume=str(run)))
    assert train(tiny_config(tmp_path, "Finetuning", resume=str(run))) == run
    assert "already complete" in capsys.readouterr().out
    assert (run / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_train_tasks_trains_and_measures_the_first_tasks_of_the_same_split(tmp_path):
    """--train-tasks 2 of --n-tasks 5: the first two tasks of the 5-task split (same classes as a
    full run's first two), a 2x2 accuracy matrix over those classes only, and a clear error when
    it exceeds the split."""
    from cclnb.data import open_dataset
    from cclnb.training import plan_tasks

    config = tiny_config(tmp_path, "Finetuning", n_tasks=5, train_tasks=2, eval_each_task="knn", knn_k=5,
                         width=16)
    targets = open_dataset("demo", "train").targets
    full, short = plan_tasks(tiny_config(tmp_path, n_tasks=5), targets, 10), plan_tasks(config, targets, 10)
    assert len(short.task_classes) == 2 and short.classes_per_task == 2
    for a, b in zip(short.task_classes, full.task_classes):
        assert np.array_equal(a, b)
    run = train(config)
    acc = read_csv(run / "eval" / "acc_knn_student.csv")
    assert [int(r["after_task"]) for r in acc] == [0, 1]
    assert set(acc[0]) == {"after_task", "task_0", "task_1", "all"}
    assert json.loads((run / "config.json").read_text())["width"] == 16
    assert load_ckpt(run / "checkpoints" / "last.pt")["task"] == 2
    with pytest.raises(ConfigError, match="--train-tasks must be between 1 and --n-tasks 5"):
        tiny_config(tmp_path, n_tasks=5, train_tasks=6).validate()


def test_the_training_stage_alone_refuses_to_skip_the_asked_per_task_evaluation(tmp_path):
    """`cclnb.training.train` gets the per-task evaluator from its caller (the training stage does
    not import the evaluation): without one, a config that asks for it is refused before any
    work, rather than silently leaving the accuracy matrix empty."""
    from cclnb.training import train as train_stage

    config = tiny_config(tmp_path, eval_each_task="knn")
    with pytest.raises(ConfigError, match="cclnb.train"):
        train_stage(config)
    assert not Path(config.run_dir).exists()
