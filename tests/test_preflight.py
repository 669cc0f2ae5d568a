"""`cclnb study`'s pre-flight: every knowable cause stops the study before any step starts, said
once, with nothing written.

No test here starts a notebook kernel: the launchers are replaced by ones that fail the test if
called (`no_steps`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from cclnb import baseline, cli, preflight, study  # noqa: F401  (baseline: imported before the timing)
from cclnb.errors import CclnbError, ConfigError, DataError
from conftest import study_cli

COMMITTED_RECORDS = Path(__file__).resolve().parent.parent / "reports" / "demo" / "runs"


@pytest.fixture
def no_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting any step fails the test: the pre-flight must refuse before that."""
    def explode(*args: object, **kwargs: object) -> None:
        raise AssertionError("a step started although the pre-flight should have refused the study")

    for name in ("_launch", "execute_step", "_run_action"):
        monkeypatch.setattr(study, name, explode)


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Run `cclnb study ARGV` under tmp_path: (exit code, stderr); nothing may be written."""
    before = sorted(tmp_path.rglob("*"))
    code = cli.main(study_cli(tmp_path, *argv))
    assert sorted(tmp_path.rglob("*")) == before, "a refused study wrote files"
    return code, capsys.readouterr().err


def test_a_parameter_out_of_range_is_said_once_before_any_step(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                no_steps: None) -> None:
    """The issue's first case: 18 runs (3 seeds x 4 methods + 2 baselines) with one bad value."""
    code, err = _refused(tmp_path, capsys, "--preset", "demo", "-p", "epochs=0", "--study", "x")
    assert code == ConfigError.exit_code
    assert err.count("--epochs must be >= 1, got 0") == 1 and "Traceback" not in err
    assert "Finetuning seed 0: task sequence (and 17 more runs)" in err
    assert "-p epochs=" in err and "nothing was written" in err


def test_a_cuda_preset_on_a_cpu_machine_fails_in_the_preflight_well_under_a_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_steps: None) -> None:
    """Timed from the plan (the modules it needs are imported above, as a study's own start-up
    imports them before the pre-flight runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = study.plan_study("tin100-32", ["data=demo", "dataset=demo"], runs_root=tmp_path / "runs",
                            reports_root=tmp_path / "reports")
    tic = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        study.run_study(plan, log=lambda _: None)
    elapsed = time.perf_counter() - tic
    message = str(info.value)
    assert "ask for device=cuda, but no CUDA GPU is visible" in message
    assert "add -p device=cpu -p linear_eval.device=cpu" in message
    assert elapsed < 1.0, f"the pre-flight took {elapsed:.2f} s"
    assert not any(tmp_path.iterdir())


def test_report_only_with_a_missing_records_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         no_steps: None) -> None:
    """It used to render the report without that folder and exit 0."""
    missing = tmp_path / "nonexistent"
    code, err = _refused(tmp_path, capsys, "--preset", "demo", "--records", str(missing), "--report-only")
    assert code == DataError.exit_code
    assert f"--records {missing}: no such folder; check the path" in err


def test_records_folders_must_hold_records(tmp_path: Path, capsys: pytest.CaptureFixture, no_steps: None) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _refused(tmp_path, capsys, "--preset", "demo", "--records", str(empty))
    assert code == DataError.exit_code and f"--records {empty} holds no study records" in err
    code, err = _refused(tmp_path, capsys, "--preset", "demo", "--report-only")
    assert code == DataError.exit_code and "nothing to report" in err and "--records DIR" in err


def test_report_only_from_records_elsewhere_passes_and_writes_nothing(tmp_path: Path) -> None:
    plan = study.plan_study("demo", runs_root=tmp_path / "runs", reports_root=tmp_path / "reports",
                            report_only=True, records=[COMMITTED_RECORDS])
    preflight.check_study(plan)
    assert not any(tmp_path.iterdir())


def test_an_unwritable_runs_root_is_refused_without_leaving_a_probe(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    no_steps: None) -> None:
    (tmp_path / "a_file").write_text("x")
    code = cli.main(["study", "--preset", "demo", "--runs-root", str(tmp_path / "a_file" / "out"),
                     "--reports-root", str(tmp_path / "reports")])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code
    assert "a_file/out/demo" in err and "is not writable (Not a directory)" in err
    assert "choose another one with --runs-root" in err
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


@pytest.mark.parametrize("overrides, problem", [
    (["n_tasks=3"], r"10 classes cannot be split into 3 equal tasks.*-p n_tasks="),
    (["image_size=96"], r"linear eval \(student\) \(and 6 more linear evals\): the fast probe .* 96 px.*-p linear_eval\.protocol="),
    (["linear_eval.device=gpu"], r"invalid choice: 'gpu'.*-p linear_eval\.device="),
    (["linear_eval.protocol=lincls", "linear_eval.lr=0"], r"--lr > 0; got .*0\.0.*-p linear_eval\.lr="),
    (["eval_each_task=none"], r"untrained seed 0: evaluate at initialisation \(and 1 more run\): "
                              r"the untrained baseline is measured with the study's per-task protocol"),
    (["data=/no/such", "dataset=auto"], r"dataset path /no/such does not exist.*-p data="),
], ids=["task split", "probe size", "linear-eval device", "linear-eval lr", "baseline protocol", "data path"])
def test_what_the_notebooks_would_refuse_is_refused_first(tmp_path: Path, overrides: list[str],
                                                          problem: str) -> None:
    plan = study.plan_study("demo", overrides, runs_root=tmp_path / "runs", reports_root=tmp_path / "reports",
                            seeds=[0])
    with pytest.raises(CclnbError, match=problem):
        preflight.check_study(plan)
    assert not any(tmp_path.iterdir())


def test_a_valid_study_passes_and_force_deletes_only_after_the_preflight(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    done = runs / "demo" / "Joint" / "seed0"
    done.mkdir(parents=True)
    (done / "status.json").write_text(json.dumps({"state": "complete"}))
    refused = study.plan_study("demo", ["epochs=0"], runs_root=runs, reports_root=tmp_path / "reports",
                               methods=["Joint"], seeds=[0], force=True)
    assert refused.forced == (done,) and not refused.steps[0].done
    with pytest.raises(ConfigError):
        study.run_study(refused, log=lambda _: None)
    assert (done / "status.json").is_file(), "--force deleted a run although the study was refused"

    class Started(Exception):
        pass

    def started(*args: object) -> None:
        raise Started

    monkeypatch.setattr(study, "_launch", started)
    monkeypatch.setattr(study, "execute_step", started)
    plan = study.plan_study("demo", runs_root=runs, reports_root=tmp_path / "reports", methods=["Joint"],
                            seeds=[0], force=True)
    with pytest.raises(Started):
        study.run_study(plan, log=lambda _: None)
    assert not done.exists()
