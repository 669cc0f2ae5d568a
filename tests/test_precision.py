"""`--precision auto`: bf16 on a native-bf16 CPU only for models whose convolutions gain from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cclnb import train
from cclnb.training import precision
from cclnb.training import plan as plan_module, run as run_module
from cclnb.training.precision import first_block_px, resolve_model_precision
from test_trainer import one_thread, tiny_config  # noqa: F401  (fixture re-used)


@pytest.mark.parametrize("stem, small, size, px", [
    ("imagenet", True, 32, 8), ("cifar_pool", True, 32, 16), ("cifar", True, 32, 32),
    ("auto", True, 32, 32), ("auto", False, 224, 56),
])
def test_first_block_px_follows_the_stem(stem: str, small: bool, size: int, px: int) -> None:
    assert first_block_px(size, stem, small) == px


@pytest.mark.parametrize("stem, small, size, expected", [
    ("imagenet", True, 32, "fp32"),      # 0.6-0.7x fp32's speed under bf16 on the AMX Xeon
    ("cifar_pool", True, 32, "fp32"),    # a tie keeps the exact arithmetic
    ("cifar", True, 32, "bf16"),         # 1.6-1.9x
    ("imagenet", False, 224, "bf16"),    # the authors' setting: 56 px at the first block
])
def test_auto_on_a_native_cpu_follows_the_first_blocks_size(monkeypatch: pytest.MonkeyPatch, stem: str,
                                                            small: bool, size: int, expected: str) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_model_precision("auto", "cpu", stem, small, size) == expected


def test_auto_elsewhere_and_explicit_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_precision("fp32", "cpu", "cifar", True, 32) == "fp32"
    assert resolve_model_precision("bf16", "cpu", "imagenet", True, 32) == "bf16"
    assert resolve_model_precision("auto", "cuda", "imagenet", True, 32) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_model_precision("auto", "cpu", "cifar", True, 32) == "fp32"


def test_resume_keeps_the_precision_auto_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               one_thread) -> None:
    """The rule may change between versions; a resumed run must not change its arithmetic."""
    choices = iter(["fp32", "bf16"])
    monkeypatch.setattr(plan_module, "resolve_model_precision",
                        lambda requested, *a, **k: next(choices) if requested == "auto" else requested)
    used: list[str] = []

    class Recording(run_module.Trainer):
        def __init__(self, config, *args, **kwargs):
            used.append(config.precision)
            super().__init__(config, *args, **kwargs)

    monkeypatch.setattr(run_module, "Trainer", Recording)
    run = train(tiny_config(tmp_path, "Finetuning", precision="auto", n_tasks=2, epochs=1))
    status = json.loads((run / "status.json").read_text())
    status["state"] = "interrupted"                  # pretend it stopped, so the resume really resumes
    (run / "status.json").write_text(json.dumps(status))
    train(tiny_config(tmp_path, "Finetuning", precision="auto", n_tasks=2, epochs=1, resume=str(run)))
    assert used == ["fp32", "fp32"]
    assert json.loads((run / "config.json").read_text())["precision"] == "fp32"


def test_bf16_on_a_cpu_that_emulates_it_gets_a_note_naming_its_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """A preset pins bf16; on an AVX2-only CPU its numbers come from emulated bf16 (fp32 kernels on
    rounded operands), not bit for bit a native CPU's, and the log must say which arithmetic ran."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    note = precision.emulated_bf16_note("bf16", "cpu")
    assert note is not None and "no AVX512-BF16 or AMX" in note
    assert "--precision fp32" in note and "-p precision=fp32 with --study NAME" in note
    assert precision.EMULATED_BF16_BENCHMARK in note
    assert (Path(__file__).resolve().parent.parent / precision.EMULATED_BF16_BENCHMARK).is_file()
    assert precision.emulated_bf16_note("fp32", "cpu") is None
    assert precision.emulated_bf16_note("bf16", "cuda") is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.emulated_bf16_note("bf16", "cpu") is None


@pytest.mark.parametrize("native", [False, True])
def test_the_trainer_logs_the_note_where_bf16_is_emulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          one_thread, native: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    run = train(tiny_config(tmp_path, "Finetuning", precision="bf16", n_tasks=2, epochs=1, train_tasks=1))
    log = (run / "train.log").read_text()
    assert ("note: precision bf16 on a CPU without native bf16" in log) is not native


@pytest.mark.parametrize("flags", [[], ["avx512_bf16", "amx_bf16"]])
def test_a_record_says_how_its_cpu_computed_bf16(monkeypatch: pytest.MonkeyPatch, flags: list[str]) -> None:
    """"AMD EPYC" named cores with and without native bf16 in this project's records: the record
    says which arithmetic ran, and the reports' device label marks the emulated one."""
    from cclnb.study.report import device_label
    from cclnb.training.runs import environment_info

    monkeypatch.setattr(precision, "native_bf16_flags", lambda: flags)
    hardware = environment_info()["hardware"]
    hardware.pop("gpus", None)
    assert hardware["cpu_bf16"] == ("native (avx512_bf16 amx_bf16)" if flags
                                    else "emulated: fp32 kernels on bf16-rounded operands")
    label = device_label({**hardware, "cpu_model": "AMD EPYC", "cpu_count": 2})
    assert label == ("AMD EPYC x2" if flags else "AMD EPYC x2 (bf16 emulated)")
    assert device_label({"cpu_model": "AMD EPYC", "cpu_count": 2}) == "AMD EPYC x2"   # records before the field
