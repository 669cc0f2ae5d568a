"""Checkpoints: weights_only round trip, atomic writes, clear errors, the authors' format."""

from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest
import torch

from cclnb.errors import CheckpointError, ConfigError
from cclnb.training.checkpoint import (FORMAT, backbone_state_dict, load_checkpoint, publish_copy, rng_state,
                                       save_checkpoint, set_rng_state)
from cclnb.training.models import MoCo, build_backbone


@pytest.fixture(scope="module")
def run_state() -> dict:
    """What a trainer saves: MoCo, teacher, optimizer (with momentum buffers), counters, replay ids."""
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=8, k=16, small_images=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "teacher": model.encoder_q.state_dict(), "optimizer": opt.state_dict(),
            "task": 1, "epoch": 3, "replay": [[1, 2, 2], [7]], "config": {"method": "CCL", "lr": 0.03}}


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_loads_with_weights_only(run_state: dict, tmp_path) -> None:
    path = tmp_path / "new" / "folder" / "last.pt"            # the folder is created
    save_checkpoint({**run_state, "rng": rng_state()}, path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT
    loaded = load_checkpoint(path)
    _assert_same({k: v for k, v in loaded.items() if k not in ("rng", "format")}, run_state)
    assert os.listdir(path.parent) == ["last.pt"]            # no temporary file left


def test_rng_state_round_trip(tmp_path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


def test_unloadable_entries_are_refused_before_writing(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"state\['replay'\]\[0\] is a ndarray"):
        save_checkpoint({"replay": [np.arange(3)]}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="float64"):
        save_checkpoint({"loss": np.float64(1.0)}, tmp_path / "x.pt")
    assert not any(tmp_path.iterdir())


def test_failure_during_save_keeps_previous_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left.*MiB free there.*previous file is intact"):
        save_checkpoint({"epoch": 3, "w": torch.zeros(3)}, path)

    def disk_full_in_the_zip_writer(obj, f, *args, **kwargs):
        """What torch 2.x raises when the disk fills while it closes the archive (seen in CI)."""
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(torch, "save", disk_full_in_the_zip_writer)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*unexpected pos.*MiB free there"):
        save_checkpoint({"epoch": 4, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_stale_temporary_files_are_cleaned(tmp_path) -> None:
    stale = tmp_path / ".last.pt.deadbeef.tmp"                 # left by a run killed mid-write
    stale.write_bytes(b"partial")
    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    assert not stale.exists()


def test_truncated_and_corrupt_files_are_named(tmp_path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint({"w": torch.randn(1000)}, good)
    data = good.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "empty.pt": b"", "noise.pt": os.urandom(256)}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name) as info:
            load_checkpoint(tmp_path / name)
        assert "cclnb checkpoint" in str(info.value) or "truncated or corrupt" in str(info.value)


def test_missing_folder_and_foreign_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt is not a cclnb checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt is not a cclnb checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"format": "cclnb-checkpoint-v9"}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="cclnb-checkpoint-v9"):
        load_checkpoint(tmp_path / "future.pt")


def test_unwritable_destination(tmp_path) -> None:
    """A run directory that cannot hold files (here its parent is a file; as root, permissions
    would not stop the write) gives a CheckpointError that says what to do."""
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="could not write checkpoint .*writable --run-dir"):
        save_checkpoint({"epoch": 1}, blocker / "checkpoints" / "last.pt")


def test_backbone_from_cclnb_checkpoint(run_state: dict, tmp_path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(run_state, path)
    for who, source in (("student", "encoder_q.backbone."), ("teacher", None)):
        weights = backbone_state_dict(path, who=who)
        net = build_backbone("resnet18", small_images=True)
        net.load_state_dict(weights)                          # strict: every name maps
        expected = run_state["model"]["encoder_q.backbone.conv1.weight"] if source else \
            run_state["teacher"]["backbone.conv1.weight"]
        assert torch.equal(net.conv1.weight, expected)
    with pytest.raises(CheckpointError, match="only CCL runs have a teacher"):
        backbone_state_dict({**run_state, "format": FORMAT, "teacher": None}, who="teacher")
    with pytest.raises(ConfigError, match="student"):
        backbone_state_dict(path, who="key")


def _authors_state_dict(enc_state: dict, module: str) -> dict:
    """The authors' key layout: torchvision ResNet whose `fc` is the (MLP) head, under DDP's `module.`."""
    renamed = {}
    for k, v in enc_state.items():
        name = k[len("backbone."):] if k.startswith("backbone.") else "fc." + k[len("head."):]
        renamed[f"module.{module}.{name}"] = v
    return renamed


def test_backbone_from_authors_checkpoint(run_state: dict, tmp_path) -> None:
    student = {k[len("encoder_q."):]: v for k, v in run_state["model"].items() if k.startswith("encoder_q.")}
    teacher = {k: v + 1 if v.is_floating_point() else v for k, v in student.items()}
    path = tmp_path / "moco_checkpoint_0.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18",
                "state_dict": {**_authors_state_dict(student, "encoder_q"), **_authors_state_dict(teacher, "teacher"),
                               "module.queue": torch.zeros(8, 16)},
                "optimizer": {"state": {}, "param_groups": []},
                "saved_X": [np.array(["train/n01/a.JPEG", "train/n02/b.JPEG"])], "saved_Y": [np.array([0, 1])]},
               path)
    for who, source in (("student", student), ("teacher", teacher)):
        weights = backbone_state_dict(path, who=who)
        assert not any(k.startswith("fc.") for k in weights)
        net = build_backbone("resnet18", small_images=True)
        net.load_state_dict(weights)
        assert torch.equal(net.layer4[1].bn2.weight, source["backbone.layer4.1.bn2.weight"])
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a cclnb checkpoint .* nor the authors'"):
        backbone_state_dict(tmp_path / "other.pt")


@pytest.mark.parametrize("hard_links", [True, False])
def test_published_copy_is_complete_and_survives_the_next_save(tmp_path, monkeypatch, hard_links) -> None:
    """A task's end serializes its state once (task_<t>.pt) and publishes it as last.pt; the next
    save replaces last.pt and must leave task_<t>.pt as it was, with or without hard links."""
    if not hard_links:
        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, "hard links not supported")
        monkeypatch.setattr(os, "link", no_links)
    task_file, last = tmp_path / "task_0.pt", tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, last)
    save_checkpoint({"epoch": 4, "w": torch.full((3,), 4.0)}, task_file)
    publish_copy(task_file, last)
    assert load_checkpoint(last)["epoch"] == 4
    assert (os.stat(last).st_ino == os.stat(task_file).st_ino) == hard_links
    save_checkpoint({"epoch": 5, "w": torch.zeros(3)}, last)
    assert load_checkpoint(task_file)["epoch"] == 4
    assert torch.equal(load_checkpoint(task_file)["w"], torch.full((3,), 4.0))
    assert load_checkpoint(last)["epoch"] == 5
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "task_0.pt"]


def test_a_trainer_checkpoint_names_no_python_global(tmp_path) -> None:
    """A checkpoint holds tensors and plain values only, never a class or function by its module
    path: checkpoints written before the package's modules moved into stage folders still load
    and resume (checked once by hand: one written at 1a1ef40, resumed after the move, ended
    bit-identical to the uninterrupted run)."""
    from cclnb import TrainConfig, Trainer, load_uint8, open_dataset

    data = open_dataset("demo")
    config = TrainConfig(method="CCL", arch="resnet18", stem="imagenet", n_tasks=5, n_save=2, epochs=1,
                         batch_size=16, moco_k=64, ccl_k=16, bn_groups=2, key_bn_groups=2,
                         subset_per_class=10, seed=0, device="cpu", progress=False, eval_each_task="none")
    trainer = Trainer.from_images(config, load_uint8(data), data.targets, run_dir=tmp_path / "run")
    trainer.start_task(0)
    trainer.run_epoch()
    trainer.finish_task()                                     # writes task_0.pt and last.pt
    for name in ("task_0.pt", "last.pt"):
        path = tmp_path / "run" / "checkpoints" / name
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        assert load_checkpoint(path)["task"] == 1


def test_a_failed_first_save_does_not_claim_a_previous_file(tmp_path, monkeypatch) -> None:
    """The message said "the previous file is intact" when there was none."""
    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, tmp_path / "last.pt")
    assert "previous file" not in str(info.value) and "nothing was written" in str(info.value)
    assert os.listdir(tmp_path) == []
