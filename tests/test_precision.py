"""`--precision auto`: bf16 on a native-bf16 CPU only where it is measurably faster for the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cclnb import precision, trainer
from cclnb.precision import (BF16_MIN_SPEEDUP, backbone_step, faster_precision, resolve_model_precision,
                             time_precisions)
from cclnb.trainer import train
from test_trainer import one_thread, tiny_config  # noqa: F401  (fixture re-used)


@pytest.mark.parametrize("fp32, bf16, expected", [
    (1.0, 1.0, "fp32"),                            # a tie keeps the exact arithmetic
    (1.0, 1.0 / (BF16_MIN_SPEEDUP * 0.99), "fp32"),  # faster, but inside the margin
    (1.0, 1.0 / BF16_MIN_SPEEDUP, "bf16"),
    (1.0, 0.6, "bf16"),                            # the 3x3 stem on an AMX CPU
    (0.6, 1.0, "fp32"),                            # the ImageNet stem at 32 px on the same CPU
])
def test_bf16_is_chosen_only_when_clearly_faster(fp32: float, bf16: float, expected: str) -> None:
    assert faster_precision({"fp32": fp32, "bf16": bf16}) == expected


def test_time_precisions_times_each_arithmetic_after_a_warm_up_call() -> None:
    seen: list[bool] = []
    ticks = iter([0.0, 4.0, 10.0, 12.0])          # fp32: 2 calls in 4 s; bf16: 2 calls in 2 s

    def step() -> None:
        seen.append(torch.is_autocast_enabled("cpu"))

    seconds = time_precisions(step, repeats=2, clock=lambda: next(ticks))
    assert seconds == {"fp32": 2.0, "bf16": 1.0}
    assert seen == [False] * 3 + [True] * 3          # one untimed call first, each under its own autocast


def test_auto_needs_native_bf16_and_a_cpu_to_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_timed_backbone_choice", lambda *a: pytest.fail("must not time"))
    shape = ("resnet18", True, "imagenet", 8, 4)
    assert resolve_model_precision("fp32", "cpu", *shape, train=True) == "fp32"
    assert resolve_model_precision("bf16", "cpu", *shape, train=True) == "bf16"
    assert resolve_model_precision("auto", "cuda", *shape, train=True) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_model_precision("auto", "cpu", *shape, train=True) == "fp32"


def test_auto_on_a_native_cpu_times_the_model_once(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    precision._timed_backbone_choice.cache_clear()
    shape = ("resnet18", True, "imagenet", 8, 4)
    first = resolve_model_precision("auto", "cpu", *shape, train=False)
    assert first in ("fp32", "bf16")
    assert resolve_model_precision("auto", "cpu", *shape, train=False) == first
    out = capsys.readouterr().out
    assert out.count("precision auto:") == 1 and "forward:" in out and "bf16 autocast" in out


def test_backbone_step_is_a_forward_or_a_training_step() -> None:
    features = backbone_step("resnet18", True, "imagenet", 8, 4, train=False)()
    assert features.shape == (4, 512) and not features.requires_grad
    loss = backbone_step("resnet18", True, "imagenet", 8, 4, train=True)()
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_resume_keeps_the_precision_auto_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               one_thread) -> None:
    """A CPU's timing may come out differently the next time; a resumed run must not change arithmetic."""
    choices = iter(["fp32", "bf16"])
    monkeypatch.setattr(trainer, "resolve_model_precision",
                        lambda requested, *a, **k: next(choices) if requested == "auto" else requested)
    used: list[str] = []
    original = trainer.pretrain

    def pretrain(config, *args, **kwargs):
        used.append(config.precision)
        return original(config, *args, **kwargs)

    monkeypatch.setattr(trainer, "pretrain", pretrain)
    run = train(tiny_config(tmp_path, "Finetuning", precision="auto", n_tasks=2, epochs=1))
    status = json.loads((run / "status.json").read_text())
    status["state"] = "interrupted"                  # pretend it stopped, so the resume really resumes
    (run / "status.json").write_text(json.dumps(status))
    train(tiny_config(tmp_path, "Finetuning", precision="auto", n_tasks=2, epochs=1, resume=str(run)))
    assert used == ["fp32", "fp32"]
    assert json.loads((run / "config.json").read_text())["precision"] == "fp32"
