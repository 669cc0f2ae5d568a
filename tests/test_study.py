"""`cclnb study`: presets, -p validation and typing, the plan, failure reporting.

These tests never train: they read the notebooks' parameters cells and, for the failure path,
run a task-sequence notebook that stops at its config check (one kernel start).
"""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest

from cclnb import study
from cclnb.commands import cli
from cclnb.errors import ConfigError, DataError
from cclnb.study import papermill_step

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def specs() -> dict[str, dict]:
    from cclnb.study.plan import study_specs

    return study_specs()      # the notebooks' parameters cells, and the methods' options


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_stripped_and_every_parameter_parses(path: Path) -> None:
    """Committed without outputs, kernel python3, and papermill sees every parameter (a comment
    with an apostrophe once hid one: it would then silently ignore -p for that name)."""
    nb = nbformat.read(str(path), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assigned = {t.id for node in ast.parse(tagged[0].source).body
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])}
    assert set(papermill.inspect_notebook(str(path))) == assigned


def test_every_preset_names_only_declared_parameters(specs: dict) -> None:
    for preset in study.PRESETS.values():
        study.check_preset(preset, specs)
    assert {"demo", "tin100-32", "tin200-32", "imagenet-sub", "cifar100"} <= set(study.PRESETS)
    sub = study.PRESETS["imagenet-sub"].task_sequence
    assert (sub["arch"], sub["image_size"], sub["n_tasks"], sub["epochs"], sub["moco_k"],
            sub["moco_t"], sub["lr"], sub["batch_size"]) == ("resnet50", 224, 10, 200, 65536, 0.2, 0.03, 256)
    assert sub["mlp"] and sub["aug_plus"] and sub["cos"] and sub["imagenetsub"]


def test_check_preset_rejects_an_undeclared_name(specs: dict) -> None:
    bad = study.Preset("bad", "", task_sequence={"epoch": 1}, linear_eval={}, methods=("Finetuning",))
    with pytest.raises(ConfigError, match=r"\['epoch'\].*task_sequence.ipynb"):
        study.check_preset(bad, specs)


def test_overrides_are_typed_from_the_defaults_and_routed(specs: dict) -> None:
    routed = study.split_overrides(
        ["epochs=3", "lr=0.5", "cos=false", "image_size=None", "extra={\"knn_t\": 0.2}",
         "linear_eval.epochs=30", "linear_eval.schedule=[2, 3]", "data=/x=y.zip", "title=A b"], specs)
    assert routed["task_sequence"] == {"epochs": 3, "lr": 0.5, "cos": False, "image_size": None,
                                       "extra": {"knn_t": 0.2}, "data": "/x=y.zip"}
    assert routed["linear_eval"] == {"epochs": 30, "schedule": [2, 3]}
    assert routed["report"] == {"title": "A b"}
    assert isinstance(routed["task_sequence"]["lr"], float)


@pytest.mark.parametrize("pair, message", [
    ("epoch=3", r"unknown parameter 'epoch'; valid names are -> task_sequence: .*epochs"),
    ("epochs=three", r"epochs='three': expected int"),
    ("cos=maybe", r"expected bool"),
    ("schedule=5", r"expected list"),
    ("nb.epochs=1", r"unknown notebook prefix 'nb'"),
    ("run_dir=/tmp/x", r"set by the study runner"),
    ("seed=7", r"set by the study runner .* use --seeds instead"),
    ("epochs", r"name=value"),
])
def test_bad_overrides_are_config_errors(specs: dict, pair: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        study.split_overrides([pair], specs)


def test_cli_typo_lists_the_valid_names(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = cli.main(["study", "--preset", "demo", "-p", "epoch=3", "--runs-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code
    assert "unknown parameter 'epoch'" in err and "epochs" in err and "n_tasks" in err
    assert not any(tmp_path.iterdir()), "nothing may run after a rejected parameter"


def test_plan_orders_steps_seed_by_seed_and_marks_finished_ones(tmp_path: Path) -> None:
    runs_root = tmp_path / "runs"
    done = runs_root / "demo" / "Finetuning" / "seed1"
    done.mkdir(parents=True)
    (done / "status.json").write_text(json.dumps({"state": "complete"}))
    (done / "lincls_student.json").write_text("{}")
    plan = study.plan_study("demo", ["epochs=2"], runs_root=runs_root, reports_root=tmp_path / "rep",
                            methods=["Finetuning", "CLL"], seeds=[1, 4])
    assert plan.seeds == (1, 4)
    seed1 = ["Finetuning seed 1: task sequence", "Finetuning seed 1: linear eval (student)",
             "Finetuning seed 1: record", "CCL seed 1: task sequence", "CCL seed 1: linear eval (student)",
             "CCL seed 1: linear eval (teacher)", "CCL seed 1: record",
             "untrained seed 1: evaluate at initialisation", "untrained seed 1: linear eval (student)",
             "untrained seed 1: record", "untrained-bn seed 1: evaluate at initialisation",
             "untrained-bn seed 1: linear eval (student)", "untrained-bn seed 1: record"]
    assert [s.label for s in plan.steps] == [*seed1, *(label.replace("seed 1", "seed 4") for label in seed1),
                                             "report"]
    # finished: Finetuning seed 1 (its record is rewritten from the run directory every time)
    assert [s.label for s in plan.steps if s.done] == seed1[:2]
    ccl = plan.steps[3]
    assert ccl.parameters["epochs"] == 2 and ccl.parameters["method"] == "CCL"
    assert ccl.parameters["seed"] == 1 and plan.steps[4].parameters["seed"] == 1
    assert ccl.parameters["run_dir"] == str(runs_root.resolve() / "demo" / "CCL" / "seed1")
    assert ccl.output == runs_root.resolve() / "demo" / "CCL" / "seed1" / "task_sequence.ipynb"
    records_dir = (tmp_path / "rep" / "demo" / "runs").resolve()
    assert plan.steps[6].output == records_dir / "CCL-seed1.json" and plan.steps[6].action
    assert plan.steps[-1].parameters["out_dir"] == str((tmp_path / "rep" / "demo").resolve())
    assert plan.steps[-1].parameters["records"] == [str(records_dir)]
    assert plan.html == (tmp_path / "rep" / "demo" / "index.html").resolve()
    forced = study.plan_study("demo", runs_root=runs_root, methods=["Finetuning"], seeds=[1], force=True)
    # planned afresh; run_study deletes the run once its pre-flight has passed (test_preflight)
    assert not forced.steps[0].done and forced.forced == (done.resolve(),) and done.exists()


def test_the_demo_probes_in_process_and_the_paper_protocol_in_notebooks(tmp_path: Path) -> None:
    """Preset.inline_probe: the probe's linear evals are actions writing lincls_<who>.json with every
    parameter the notebook would hold; the paper's protocol, or a preset without it, runs notebooks."""
    evals = lambda plan: [s for s in plan.steps if s.notebook == "linear_eval"]
    demo = study.plan_study("demo", runs_root=tmp_path, methods=["CCL"], seeds=[0], baseline=False)
    assert [(s.output.name, s.action is not None) for s in evals(demo)] == [
        ("lincls_student.json", True), ("lincls_teacher.json", True)]
    parameters = evals(demo)[1].parameters
    assert parameters["who"] == "teacher" and parameters["protocol"] == "probe"
    assert parameters["epochs"] == 50 and parameters["batch_size"] == 256  # the notebook's default
    paper = study.plan_study("demo", ["linear_eval.protocol=lincls"], runs_root=tmp_path, methods=["CCL"],
                             seeds=[0], baseline=False)
    assert [(s.output.name, s.action) for s in evals(paper)] == [
        ("linear_eval_student.ipynb", None), ("linear_eval_teacher.ipynb", None)]
    cpu = study.plan_study("tin100-32-cpu-w16", ["data=demo"], runs_root=tmp_path, methods=["Joint"],
                           seeds=[0], baseline=False)
    assert [(s.output.name, s.action) for s in evals(cpu)] == [("linear_eval_student.ipynb", None)]


def test_preset_seeds_report_only_and_extra_records(tmp_path: Path) -> None:
    plan = study.plan_study("demo", runs_root=tmp_path, reports_root=tmp_path / "rep", methods=["Joint"],
                            baseline=False)
    assert plan.seeds == (0, 1, 2) and len(plan.steps) == 3 * 3 + 1
    only = study.plan_study("demo", runs_root=tmp_path, reports_root=tmp_path / "rep", report_only=True,
                            records=[tmp_path / "other"])
    assert [s.label for s in only.steps] == ["report"]
    assert only.steps[0].parameters["records"] == [str((tmp_path / "rep" / "demo" / "runs").resolve()),
                                                   str((tmp_path / "other").resolve())]
    with pytest.raises(ConfigError, match="--seeds needs one or more non-negative"):
        study.plan_study("demo", runs_root=tmp_path, seeds=[-1])
    # the budget axis: other studies' records folders reach the report absolute, and must hold records
    other = tmp_path / "e16" / "runs"
    other.mkdir(parents=True)
    with pytest.raises(DataError, match="report.budget names .* which holds no study records"):
        study.plan_study("demo", [f'report.budget=["{other}"]'], runs_root=tmp_path, report_only=True)
    (other / "Finetuning-seed0.json").write_text("{}")
    budget = study.plan_study("demo", [f'report.budget=["{other}"]'], runs_root=tmp_path, report_only=True)
    assert budget.steps[-1].parameters["budget"] == [str(other.resolve())]


def test_the_untrained_step_builds_the_task_sequence_config() -> None:
    params = {**study.PRESETS["demo"].task_sequence, "method": "untrained", "run_dir": "/x", "seed": 3,
              "extra": {"knn_t": 0.2}}
    config = study.train_config({**params, "method": "Finetuning"})
    assert (config.seed, config.run_dir, config.knn_t, config.arch) == (3, "/x", 0.2, "resnet18")


def test_preset_without_data_asks_for_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pass -p data=PATH"):
        study.plan_study("imagenet-sub", runs_root=tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'dem'"):
        study.plan_study("dem", runs_root=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2], ids=["sequential", "concurrent"])
def test_a_failing_step_names_the_notebook_and_cell(tmp_path: Path, jobs: int) -> None:
    """A fault the pre-flight cannot see fails inside the notebook: the study resumes a run
    directory that holds a checkpoint but no config.json. With concurrent jobs the cell is read
    back from the executed copy the subprocess left."""
    checkpoints = tmp_path / "runs" / "demo" / "Joint" / "seed0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.pt").write_bytes(b"not a checkpoint")
    plan = study.plan_study("demo", [], runs_root=tmp_path / "runs",
                            reports_root=tmp_path / "reports", methods=["Joint"], jobs=jobs,
                            seeds=[0], baseline=False)
    with pytest.raises(study.StudyStepFailed) as info:
        study.run_study(plan, log=lambda _: None)
    message = str(info.value)
    assert "[1/4] Joint seed 0: task sequence failed in notebooks/task_sequence.ipynb, cell " in message
    assert "In [" in message and "CheckpointError" in message and "not a cclnb run directory" in message
    assert str(plan.steps[0].output) in message
    assert plan.steps[0].output.is_file()  # the executed copy with the traceback is kept
    assert info.value.exit_code == study.StudyStepFailed.exit_code != 0
    assert not plan.html.exists()


def test_a_relative_data_path_reaches_the_notebooks_absolute(tmp_path, monkeypatch):
    """Notebooks run in their own working directory: `-p data=rel/path.zip` must still resolve."""
    from cclnb.study import plan_study

    data = tmp_path / "data" / "set.zip"
    data.parent.mkdir()
    data.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    study = plan_study("tin100-32", ["data=data/set.zip"], runs_root=tmp_path / "runs",
                       reports_root=tmp_path / "reports")
    first = study.steps[0]
    assert first.parameters["data"] == str(data.resolve())


@pytest.mark.parametrize("name", [n for n in study.PRESETS if (study.REPO_ROOT / "reports" / n / "runs").is_dir()])
def test_a_preset_with_committed_records_pins_their_precision(name: str) -> None:
    """A seed added later must be averaged with the committed ones, so whatever a record depends on
    is fixed by the preset, not resolved per machine: `precision: auto` once gave fp32 where the
    committed records were bf16, and the new seed was refused from the average."""
    import json

    pinned = study.PRESETS[name].task_sequence["precision"]
    assert pinned in ("fp32", "bf16"), f"preset {name} leaves precision to the machine ({pinned!r})"
    folder = study.REPO_ROOT / "reports" / name / "runs"
    recorded = {json.loads(p.read_text())["config"]["precision"] for p in folder.glob("*-seed*.json")}
    assert recorded == {pinned}


def test_the_study_console_carries_no_kernel_transport_warning(tmp_path: Path, monkeypatch) -> None:
    """ipykernel warns at every start that its local TCP sockets are unencrypted: noise in a
    study's console and its steps' logs. Every step, in the study's process or its own, starts its
    kernel with its log level at ERROR, and the untrained baselines, run in the study's process,
    print no progress bars."""
    seen: dict = {}
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: seen.update(kwargs))
    plan = study.plan_study("demo", runs_root=tmp_path, reports_root=tmp_path / "rep", methods=["Joint"],
                            seeds=[0])
    study.execute_step(plan.steps[-1])
    assert "--IPKernelApp.log_level=ERROR" in seen["extra_arguments"]
    # the steps a study runs in their own processes go through the same call (papermill's command
    # line cannot pass kernel arguments), the parameters read back from the step's file
    seen.clear()
    step = plan.steps[0]
    params = tmp_path / "params.json"
    params.write_text(json.dumps(step.parameters))
    popen: list = []
    monkeypatch.setattr(subprocess, "Popen", lambda command, **kwargs: popen.append(command))
    study.run._launch(step, None, 1)
    assert popen[0][1:3] == ["-m", "cclnb.study.papermill_step"]
    assert papermill_step.main([*popen[0][3:5], str(params)]) == 0
    assert "--IPKernelApp.log_level=ERROR" in seen["extra_arguments"] and seen["parameters"] == step.parameters
    untrained = next(s for s in plan.steps if s.notebook == "untrained")
    assert untrained.action.func is study.plan._untrained
    calls: list = []
    monkeypatch.setattr("cclnb.study.baseline.untrained_run", lambda config, calibrate: calls.append(config))
    untrained.action()
    assert calls[0].progress is False


def test_concurrent_jobs_start_the_costliest_runs_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With jobs in parallel the teacher methods (the longest runs) start first, seed after seed,
    so that no core idles at the end while one of them finishes; each group keeps its own order."""
    from cclnb.study import run as study_run

    plan = study.plan_study("demo", runs_root=tmp_path / "runs", reports_root=tmp_path / "rep",
                            methods=["Finetuning", "CCL", "Joint"], seeds=[0, 1], baseline=False)
    launched: list[str] = []

    class Finished:
        returncode = 0

        def poll(self) -> int:
            return 0

    def launch(step: study.Step, *_: object, **__: object) -> Finished:
        launched.append(step.label)
        return Finished()

    monkeypatch.setattr(study_run, "_launch", launch)
    monkeypatch.setattr(study_run, "_run_action", lambda *_: None)   # the probes and records
    tasks = [(i, s) for i, s in enumerate(plan.steps[:-1], 1) if s.notebook == "task_sequence"]
    assert study_run._run_concurrently(tasks, plan, None, lambda _: None, len(plan.steps)) == []
    assert launched == ["CCL seed 0: task sequence", "CCL seed 1: task sequence",
                        "Finetuning seed 0: task sequence", "Joint seed 0: task sequence",
                        "Finetuning seed 1: task sequence", "Joint seed 1: task sequence"]
    assert study.expected_cost("CCL-no-distill") > study.expected_cost("SimpleReplay") > study.expected_cost("untrained")


def test_methods_are_deduplicated_like_seeds(tmp_path: Path) -> None:
    """`--methods CCL CCL` trained CCL, then failed the duplicate step (exit 6, no report) and replaced
    the good executed notebook; `--seeds 1 1` was already one seed. Aliases count as their method."""
    plan = study.plan_study("demo", runs_root=tmp_path, reports_root=tmp_path / "rep",
                            methods=["CCL", "Finetuning", "CLL", "ccl"], seeds=[1, 1], baseline=False)
    assert [s.label for s in plan.steps if s.notebook == "task_sequence"] == [
        "CCL seed 1: task sequence", "Finetuning seed 1: task sequence"]


@pytest.mark.parametrize("name", ["../../escape", "a b/c", "..", ".hidden", "a/b", "", "-x"])
def test_a_study_name_is_one_safe_folder_name(tmp_path: Path, name: str) -> None:
    """`--study ../../escape` wrote outside --runs-root and --reports-root (runs and report mixed in
    one folder); `--study "a b/c"` nested folders."""
    with pytest.raises(ConfigError, match=r"--study .*: a study name is one folder name"):
        study.plan_study("demo", runs_root=tmp_path / "runs", reports_root=tmp_path / "rep", study=name)
    assert not (tmp_path / "runs").exists()
    assert study.plan_study("demo", runs_root=tmp_path, study="demo_lr-0.05").name == "demo_lr-0.05"


def test_a_record_names_the_data_the_run_read(tmp_path: Path) -> None:
    """config.json and the record carry the identity of the data actually read (here the embedded
    shapes' name and version), beside the `data` the config asked for; it is provenance, so it
    never makes two records incomparable."""
    import torch

    from cclnb import train
    from cclnb.study.records import write_record
    from test_trainer import tiny_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(tiny_config(tmp_path, "CCL"))
    finally:
        torch.set_num_threads(threads)
    shapes = {"kind": "demo", "name": "demo-shapes", "version": "v2"}
    assert json.loads((run / "config.json").read_text())["data_identity"] == shapes
    record = json.loads(write_record(run, tmp_path / "records", "x").read_text())
    assert record["provenance"]["data_identity"] == shapes and "data_identity" not in record["config"]


def test_a_record_cut_mid_string_is_named_in_plain_words(tmp_path: Path) -> None:
    """The message read "(Unterminated string starting at at line 1)"."""
    from cclnb.study.records import read_record

    cut = tmp_path / "CCL-seed0.json"
    cut.write_text('{"format": "cclnb-rec')
    with pytest.raises(DataError) as info:
        read_record(cut)
    assert "at at" not in str(info.value)
    assert "is not valid JSON (Unterminated string starting at: line 1 column 12 (char 11))" in str(info.value)


def test_a_mistyped_value_quotes_the_value_the_preset_sets(tmp_path: Path) -> None:
    """`-p lr=fast` on the demo quoted the notebook's default (0.03) where the demo runs at 0.1."""
    with pytest.raises(ConfigError, match=r"-p lr='fast': expected float \(the preset demo has 0\.1\)"):
        study.plan_study("demo", ["lr=fast"], runs_root=tmp_path)
    with pytest.raises(ConfigError, match=r"-p moco_dim='x': expected int \(default 128\)"):   # not set by the demo
        study.plan_study("demo", ["moco_dim=x"], runs_root=tmp_path)


def test_records_left_out_of_the_averages_are_said_on_the_terminal(tmp_path: Path) -> None:
    """It was said only on the report page."""
    from cclnb.study import run as study_run
    from test_aggregate import fixture_record, write_records

    other = fixture_record("Finetuning", 2, 50.0)
    other["config"]["lr"] = 0.5
    folder = write_records(tmp_path / "runs", fixture_record("Finetuning", 0, 50.0),
                           fixture_record("Finetuning", 1, 51.0), other)
    lines: list[str] = []
    study_run.say_left_out([folder], lines.append)
    assert len(lines) == 1 and lines[0].startswith(
        f"left out of the averages (see the report): {folder / 'Finetuning-seed2.json'} (Finetuning seed 2): ")
    assert "lr" in lines[0]
