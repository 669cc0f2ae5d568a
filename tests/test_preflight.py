"""`cclnb study`'s pre-flight and failure report: every knowable cause stops the study before any
step starts, said once, with nothing written; runs that fail anyway are grouped by cause.

No test here starts a notebook kernel: the launchers are replaced by ones that fail the test if
called (`no_steps`), or by fakes that leave what a failed notebook leaves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pytest
import torch

from cclnb import study
from cclnb.commands import cli
from cclnb.errors import CclnbError, ConfigError, DataError
from cclnb.study import run as study_run
from cclnb.study import baseline, preflight, records
from cclnb.study import plan as study_plan
from conftest import study_cli

COMMITTED_RECORDS = Path(__file__).resolve().parent.parent / "reports" / "demo" / "runs"


@pytest.fixture
def no_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting any step fails the test: the pre-flight must refuse before that."""
    def explode(*args: object, **kwargs: object) -> None:
        raise AssertionError("a step started although the pre-flight should have refused the study")

    for name in ("_launch", "execute_step", "_run_action"):
        monkeypatch.setattr(study_run, name, explode)


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

    def started(*args: object, **kwargs: object) -> None:
        raise Started

    monkeypatch.setattr(study_run, "_launch", started)
    monkeypatch.setattr(study_run, "execute_step", started)
    plan = study.plan_study("demo", runs_root=runs, reports_root=tmp_path / "reports", methods=["Joint"],
                            seeds=[0], force=True)
    with pytest.raises(Started):
        study.run_study(plan, log=lambda _: None)
    assert not done.exists()


# ----------------------------------------------------------------------------- runs that fail anyway
class _Exited:
    """What `_launch` returns, for a papermill process that has already exited with `code`."""

    def __init__(self, code: int) -> None:
        self.returncode = code

    def poll(self) -> int:
        return self.returncode


def _failing_notebook(step: study.Step, notebooks_dir: object, threads: int, **popen: object) -> _Exited:
    """Leave what papermill leaves when cell 3 raises: the executed copy with the error output."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"cell {i}") for i in range(4)])
    nb.cells[3].execution_count = 2
    nb.cells[3].outputs = [nbformat.v4.new_output("error", ename="ConfigError", evalue="boom",
                                                  traceback=["Traceback ...", "ConfigError: boom"])]
    step.output.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(step.output))
    return _Exited(1)


def _failing_baseline(config: object, calibrate_bn: bool = False) -> None:
    raise ConfigError("boom")


def test_identical_causes_of_concurrent_runs_are_grouped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """6 runs (Joint and both baselines, seeds 0 and 1) fail with one cause: said once, with the
    first traceback's file and a log of all, each naming the file that holds its traceback."""
    monkeypatch.setattr(study_run, "_launch", _failing_notebook)
    monkeypatch.setattr(baseline, "untrained_run", _failing_baseline)
    plan = study.plan_study("demo", runs_root=tmp_path / "runs", reports_root=tmp_path / "reports",
                            methods=["Joint"], seeds=[0, 1], jobs=2)
    with pytest.raises(study.StudyStepFailed) as info:
        study.run_study(plan, log=lambda _: None)
    message, log = str(info.value), plan.runs_dir / "failures.log"
    first = info.value.failures[0].trace
    assert message.startswith(f"6 runs failed: ConfigError: boom (first: {first}; all: {log}). Everything")
    assert message.count("boom") == 1
    lines = log.read_text().splitlines()
    assert len(lines) == 6 and all(line.endswith((".ipynb", ".log")) for line in lines)
    traces = [failure.trace for failure in info.value.failures]
    assert sorted(t.name for t in traces) == ["task_sequence.ipynb"] * 2 + ["untrained.log"] * 4
    for trace in traces:
        assert "boom" in trace.read_text() and "Traceback" in trace.read_text()


def test_a_failed_baseline_names_the_log_with_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to name the baseline's config.json as "the executed notebook"."""
    monkeypatch.setattr(study_run, "execute_step", lambda step, notebooks_dir=None: None)
    monkeypatch.setattr(study_plan, "_probe", lambda parameters, log: log)   # the demo's inline probe
    monkeypatch.setattr(records, "write_record", lambda *args: None)
    monkeypatch.setattr(baseline, "untrained_run", _failing_baseline)
    plan = study.plan_study("demo", runs_root=tmp_path / "runs", reports_root=tmp_path / "reports",
                            methods=["Joint"], seeds=[0], jobs=1)
    with pytest.raises(study.StudyStepFailed) as info:
        study.run_study(plan, log=lambda _: None)
    trace = plan.runs_dir / "untrained" / "seed0" / "untrained.log"
    assert str(info.value).startswith("[4/10] untrained seed 0: evaluate at initialisation failed in cclnb "
                                      f"(in process): ConfigError: boom. The traceback is in {trace}; ")
    assert "config.json" not in str(info.value)
    assert "Traceback" in trace.read_text() and "boom" in trace.read_text()
    assert not (plan.runs_dir / "failures.log").exists()   # one failure: its own file says it all


def test_exited_process_without_an_executed_copy_points_at_its_log(tmp_path: Path) -> None:
    step = study.Step("CCL seed 0: task sequence", "task_sequence", tmp_path / "task_sequence.ipynb", {})
    failure = study_run._subprocess_failure(step, 1, 3)
    assert failure.trace == tmp_path / "task_sequence.log"
    assert str(failure).startswith("[1/3] CCL seed 0: task sequence failed in notebooks/task_sequence.ipynb: "
                                   "stopped before the notebook started")


def test_data_the_presets_dataset_ignores_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     no_steps: None) -> None:
    """The demo fixes dataset=demo (the embedded shapes), which reads no file: `-p data=/nonexistent.zip`
    trained the whole study on the shapes (369 s, exit 0) and every record said it used that zip."""
    code, err = _refused(tmp_path, capsys, "--preset", "demo", "-p", "data=/nonexistent.zip")
    assert code == ConfigError.exit_code and "Traceback" not in err
    assert "-p data=/nonexistent.zip is not read: the study's dataset is 'demo'" in err
    assert "add -p dataset=auto" in err and "or drop -p data" in err
    # the embedded sets themselves are named by data, and a dataset kind that reads files reads it
    for ok in (["data=demo-digits"], ["data=demo", "dataset=auto"]):
        plan = study.plan_study("demo", ok, runs_root=tmp_path / "runs", reports_root=tmp_path / "rep",
                                methods=["Joint"], seeds=[0], baseline=False)
        preflight.check_study(plan)


@pytest.mark.parametrize("native", [False, True])
def test_a_study_pinned_to_bf16_on_a_cpu_that_emulates_it_is_told_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """The demo and the CPU presets pin bf16 (their records average across machines); on an
    AVX2-only CPU that arithmetic is emulated (with fp32 kernels: bf16's numbers, not a native
    CPU's bit for bit), so the study says so once, naming the parameter."""
    from cclnb.training import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    plan = study.plan_study("demo", runs_root=tmp_path / "runs", reports_root=tmp_path / "reports", seeds=[0])
    notes = preflight.check_study(plan)
    if native:
        assert notes == []
    else:
        assert len(notes) == 1 and "fp32 kernels on bf16-rounded operands" in notes[0]
        assert notes[0].endswith("this study asks for it through -p precision and -p linear_eval.precision")
    fp32 = study.plan_study("demo", ["precision=fp32", "linear_eval.precision=fp32"], runs_root=tmp_path / "runs",
                            reports_root=tmp_path / "reports", seeds=[0])
    assert preflight.check_study(fp32) == []
    assert not any(tmp_path.iterdir())
