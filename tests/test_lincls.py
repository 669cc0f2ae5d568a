"""`cclnb lincls`: flag parsing, the frozen protocol, and a tiny run on the real sub100 data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cclnb.commands.cli import build_parser, main
from cclnb.errors import ConfigError
from cclnb.evaluate.lincls import Source, load_backbone, lr_at, topk_correct
from test_trainer import one_thread  # noqa: F401  (fixture re-used)


def _parse(*argv: str):
    return build_parser("lincls").parse_args(["lincls", *argv])


def test_authors_defaults() -> None:
    args = _parse("some/data")
    assert (args.lr, args.batch_size, args.epochs, args.schedule) == (30.0, 256, 100, [60, 80])
    assert (args.momentum, args.wd, args.workers, args.print_freq) == (0.9, 0.0, 32, 10)
    assert args.data_pos == "some/data" and args.use_teacher_weight is False
    assert _parse("--data", "x", "-a", "resnet18", "--wd", "1e-4", "--learning-rate", "3").lr == 3.0


@pytest.mark.parametrize("argv, expected", [
    ((), False), (("--use_teacher_weight",), True), (("--use_teacher_weight", "True"), True),
    (("--use_teacher_weight", "False"), False), (("--use_teacher_weight", "false"), False),
    (("--use_teacher_weight", "0"), False), (("--use-teacher-weight", "1"), True),
])
def test_use_teacher_weight_is_a_real_boolean(argv: tuple, expected: bool) -> None:
    assert _parse("--data", "d", *argv).use_teacher_weight is expected


def test_notebook_args_match_the_command_line() -> None:
    """linear_eval.ipynb's parameters give the flags `cclnb lincls` would parse from them; a
    refused value is a ConfigError naming the flag, not an argparse exit."""
    from cclnb.evaluate.lincls_options import notebook_args

    args = notebook_args(dict(run_dir="runs/x", who="teacher", protocol="probe", epochs=5, batch_size=32,
                              lr=0.5, schedule=[2, 3], device="cpu", precision="fp32", seed=1, workers=0,
                              subset_per_class=None, progress=False))
    expected = _parse("--pretrained", "runs/x", "--use-teacher-weight", "True", "--protocol", "probe",
                      "--epochs", "5", "-b", "32", "--lr", "0.5", "--schedule", "2", "3", "--device", "cpu",
                      "--precision", "fp32", "--seed", "1", "-j", "0", "--no-progress")
    assert vars(args) == {k: v for k, v in vars(expected).items() if k != "command"}
    also = notebook_args({"run_dir": "runs/x", "also": ["runs/y:teacher", "runs/z"], "resume": "auto"})
    assert vars(also) == {k: v for k, v in vars(_parse("--pretrained", "runs/x", "--resume", "auto", "--also",
                                                       "runs/y:teacher", "runs/z")).items() if k != "command"}
    with pytest.raises(ConfigError, match="who must be student or teacher"):
        notebook_args({"who": "both"})
    with pytest.raises(ConfigError, match=r"argument --device: invalid choice: 'gpu'"):
        notebook_args({"device": "gpu"})


def test_use_teacher_weight_rejects_garbage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _parse("--data", "d", "--use_teacher_weight", "maybe")
    assert "expected a boolean" in capsys.readouterr().err


def test_step_schedule_and_topk() -> None:
    assert [lr_at(e, 30.0, [60, 80]) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx(
        [30, 30, 3, 3, 0.3, 0.3])
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7]])
    assert topk_correct(logits, torch.tensor([1, 2]), ks=(1, 2)) == [50.0, 100.0]


def _checkpoint(path: Path) -> tuple[dict, dict]:
    """A tiny cclnb checkpoint whose student and teacher backbones differ; returns both states."""
    from cclnb.training.checkpoint import save_checkpoint
    from cclnb.training.models import Encoder, MoCo, build_backbone

    torch.manual_seed(0)
    moco = MoCo("resnet18", dim=16, k=32, mlp=True, small_images=False, stem="imagenet")
    teacher = Encoder(build_backbone("resnet18", False, "imagenet"), 16, True)
    save_checkpoint({"model": moco.state_dict(), "teacher": teacher.state_dict()}, path)
    return moco.encoder_q.backbone.state_dict(), teacher.backbone.state_dict()


def test_teacher_flag_picks_the_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    student, teacher = _checkpoint(ckpt)
    source = Source(ckpt, {}, tmp_path)
    for who, expected, other in (("student", student, teacher), ("teacher", teacher, student)):
        loaded = load_backbone(source, {"arch": "resnet18", "stem": "imagenet", "width": 64}, False, who,
                                   torch.device("cpu")).state_dict()
        assert torch.equal(loaded["conv1.weight"], expected["conv1.weight"])
        assert not torch.equal(loaded["conv1.weight"], other["conv1.weight"])


def test_wrong_arch_is_a_checkpoint_error(tmp_path: Path) -> None:
    from cclnb.errors import CheckpointError

    ckpt = tmp_path / "ckpt.pt"
    _checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="--arch"):
        load_backbone(Source(ckpt, {}, tmp_path), {"arch": "resnet34", "stem": "imagenet", "width": 64}, False,
                      "student", torch.device("cpu"))


def test_lincls_tiny_real_run(tmp_path: Path, sub100_zip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 images per class (200), 2 epochs, ImageNet stem (fast on CPU) on the 32 px sub100 zip.

    Also checks the frozen protocol: every backbone tensor, BatchNorm running statistics
    included, is bit-identical after training (the evaluation itself raises if not; here we
    compare against the checkpoint from outside too)."""
    from cclnb.training.checkpoint import backbone_state_dict

    ckpt = tmp_path / "ckpt.pt"
    student, _ = _checkpoint(ckpt)
    seen = {}
    import cclnb.evaluate.lincls as lincls

    real_load = lincls.load_backbone

    def spy(*a, **k):
        seen["backbone"] = real_load(*a, **k)
        return seen["backbone"]

    monkeypatch.setattr(lincls, "load_backbone", spy)
    code = main(["lincls", str(sub100_zip), "--pretrained", str(ckpt), "-a", "resnet18", "--stem", "imagenet",
                 "--subset-per-class", "2", "--epochs", "2", "--schedule", "1", "-b", "64", "--lr", "1",
                 "--device", "cpu", "--use_teacher_weight", "False", "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "lincls_student.json").read_text())
    assert not (tmp_path / "lincls_teacher.json").exists()
    for key in ("top1", "top5", "best_top1", "best_epoch", "epochs", "curve", "config", "time_s"):
        assert key in result
    assert result["n_classes"] == 100 and result["n_train"] == 200 and result["n_val"] == 5000
    assert len(result["curve"]) == 2 and result["top1"] == result["curve"][-1]["val_top1"]
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert result["best_note"] == "best epoch (selected on val), as the authors report"
    after = seen["backbone"].state_dict()
    for name, value in backbone_state_dict(str(ckpt), "student").items():
        assert torch.equal(after[name], value), name
    assert any("running_mean" in k for k in after)
    assert (tmp_path / "lincls_student.pt").is_file()
    # Resume + evaluate scores the saved classifier without training.
    code = main(["lincls", "--data", str(sub100_zip), "--pretrained", str(ckpt), "-a", "resnet18",
                 "--stem", "imagenet", "--device", "cpu", "-e", "--resume",
                 str(tmp_path / "lincls_student.pt"), "--no-progress"])
    assert code == 0


def test_run_directory_supplies_defaults_and_output_folder(tmp_path: Path) -> None:
    from cclnb.evaluate.lincls import resolve_source, resolved_settings
    from cclnb.training.runs import write_json

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    write_json(run / "config.json", {"arch": "resnet18", "stem": "cifar", "data": "demo", "dataset": "demo",
                                     "image_size": 32, "imagenetsub": False})
    for pretrained in (run, run / "checkpoints" / "last.pt"):
        source = resolve_source(str(pretrained), None)
        assert source.checkpoint == run / "checkpoints" / "last.pt" and source.out_dir == run
        settings = resolved_settings(_parse(), source.run_config)
        assert (settings["arch"], settings["stem"], settings["data"], settings["image_size"]) == \
            ("resnet18", "cifar", "demo", 32)
    explicit = resolved_settings(_parse("-a", "resnet34", "--data", "other"), source.run_config)
    assert (explicit["arch"], explicit["data"]) == ("resnet34", "other")
    assert resolve_source(str(run), str(tmp_path / "elsewhere")).out_dir == tmp_path / "elsewhere"


def test_missing_pretrained_and_evaluate_without_resume(tmp_path: Path) -> None:
    from cclnb.errors import CheckpointError, ConfigError
    from cclnb.evaluate.lincls import resolve_source

    with pytest.raises(CheckpointError, match="no such file or run directory"):
        resolve_source(str(tmp_path / "nope"), None)
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints/last.pt"):
        resolve_source(str(empty_run), None)
    args = _parse("--data", "demo", "-e")
    with pytest.raises(ConfigError, match="--resume"):
        from cclnb.evaluate.lincls import linear_eval
        linear_eval(args)


def test_lincls_protocol_probe_writes_the_same_json(tmp_path: Path) -> None:
    """`cclnb lincls --protocol probe` (the demo's fast final evaluation) scores a real tiny run
    and writes lincls_<who>.json with its protocol named, as the report expects."""
    import json

    from cclnb import train
    from cclnb.commands.cli import main
    from cclnb.config import TrainConfig

    run = train(TrainConfig(data="demo", arch="resnet18", stem="imagenet", epochs=1, batch_size=16,
                            moco_k=64, ccl_k=16, n_tasks=2, n_save=2, method="CCL",
                            subset_per_class=8, seed=0, workers=0, progress=False,
                            eval_each_task="none", key_bn_groups=4, bn_groups=2, device="cpu",
                            run_dir=str(tmp_path / "run")))
    for who in ("False", "True"):
        assert main(["lincls", "--pretrained", str(run), "--protocol", "probe", "--epochs", "20",
                     "--device", "cpu", "--no-progress", "--use_teacher_weight", who]) == 0
    for who in ("student", "teacher"):
        result = json.loads((run / f"lincls_{who}.json").read_text())
        assert result["protocol"].startswith("probe") and result["who"] == who
        assert 0.0 <= result["top1"] <= 100.0 and result["n_val"] == 600


def test_encoders_sharing_one_pass_get_their_own_runs_results(tmp_path: Path, one_thread) -> None:
    """`cclnb lincls --pretrained A --also A:teacher B` reads and augments every batch once for the
    three encoders; each classifier, curve and result equals its own run's, bit for bit."""
    from cclnb import train
    from cclnb.config import TrainConfig

    runs = {method: train(TrainConfig(data="demo", arch="resnet18", stem="cifar", width=8, epochs=1,
                                      batch_size=16, moco_k=64, ccl_k=16, n_tasks=2, n_save=2, method=method,
                                      subset_per_class=8, seed=0, workers=0, progress=False,
                                      eval_each_task="none", key_bn_groups=2, bn_groups=2, device="cpu",
                                      run_dir=str(tmp_path / method)))
            for method in ("CCL", "Finetuning")}
    common = ["--epochs", "2", "-b", "16", "--lr", "1", "--subset-per-class", "4", "--device", "cpu",
              "--precision", "fp32", "--no-progress"]
    alone = {}
    for name, run, teacher in (("ccl-student", runs["CCL"], "False"), ("ccl-teacher", runs["CCL"], "True"),
                               ("ft-student", runs["Finetuning"], "False")):
        assert main(["lincls", "--pretrained", str(run), "--use_teacher_weight", teacher, *common,
                     "--out", str(tmp_path / name)]) == 0
        alone[name] = tmp_path / name
    assert main(["lincls", "--pretrained", str(runs["CCL"]), "--also", f"{runs['CCL']}:teacher",
                 str(runs["Finetuning"]), *common]) == 0
    shared = {"ccl-student": (runs["CCL"], "student"), "ccl-teacher": (runs["CCL"], "teacher"),
              "ft-student": (runs["Finetuning"], "student")}
    for name, (run, who) in shared.items():
        together = json.loads((run / f"lincls_{who}.json").read_text())
        own = json.loads((alone[name] / f"lincls_{who}.json").read_text())
        assert together["curve"] == own["curve"] and together["who"] == who
        assert (together["top1"], together["best_top1"]) == (own["top1"], own["best_top1"])
        fc_together, fc_own = (torch.load(d / f"lincls_{who}.pt", weights_only=True)["fc"]
                               for d in (run, alone[name]))
        assert all(torch.equal(fc_together[k], fc_own[k]) for k in fc_own)
    assert not (runs["Finetuning"] / "lincls_teacher.json").exists()


def test_a_stopped_shared_pass_resumes_each_encoder_exactly(tmp_path: Path, one_thread,
                                                             capsys: pytest.CaptureFixture) -> None:
    """--resume auto: every encoder of the pass continues from its own saved state; 2 epochs, then
    a third, equal a straight 3 (the LR steps at fixed epochs, the batches come from seed and epoch)."""
    import shutil

    from cclnb import train
    from cclnb.config import TrainConfig

    run = train(TrainConfig(data="demo", arch="resnet18", stem="cifar", width=8, epochs=1, batch_size=16,
                            moco_k=64, ccl_k=16, n_tasks=2, n_save=2, method="CCL", subset_per_class=8, seed=0,
                            workers=0, progress=False, eval_each_task="none", key_bn_groups=2, bn_groups=2,
                            device="cpu", run_dir=str(tmp_path / "straight")))
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    common = ["-b", "16", "--lr", "1", "--schedule", "2", "--subset-per-class", "4", "--device", "cpu",
              "--precision", "fp32", "--no-progress"]
    assert main(["lincls", "--pretrained", str(run), "--also", f"{run}:teacher", "--epochs", "3", *common]) == 0
    assert main(["lincls", "--pretrained", str(stopped), "--also", f"{stopped}:teacher", "--epochs", "2", *common]) == 0
    assert main(["lincls", "--pretrained", str(stopped), "--also", f"{stopped}:teacher", "--epochs", "3",
                 "--resume", "auto", *common]) == 0
    for who in ("student", "teacher"):
        straight, resumed = (json.loads((d / f"lincls_{who}.json").read_text()) for d in (run, stopped))
        assert len(resumed["curve"]) == 3 and resumed["curve"] == straight["curve"]
    (stopped / "lincls_teacher.pt").unlink()          # the teacher would start over, the student not
    capsys.readouterr()
    assert main(["lincls", "--pretrained", str(stopped), "--also", f"{stopped}:teacher", "--epochs", "4",
                 "--resume", "auto", *common]) == 2
    assert re.search(r"stopped at different epochs \(student of .*: 3, teacher of .*: 0\)", capsys.readouterr().err)


def test_also_refuses_what_one_pass_cannot_share(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["lincls", "--data", "demo", "--also", str(tmp_path), "--protocol", "probe"]) == 2
    assert "--also shares the augmented batches of the lincls protocol" in capsys.readouterr().err
    assert main(["lincls", "--data", "demo", "--also", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "drop -e/--evaluate and --out, and resume with --resume auto" in capsys.readouterr().err
