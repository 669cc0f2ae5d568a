"""A rerun of `cclnb study` compares before it skips (`cclnb.study.rerun`): a finished (method, seed)
made with other parameters than the command's stops the study before anything runs, naming the
parameters; `--rerun-changed` moves those runs and their records aside and runs them afresh.

No test here trains: the finished runs are written as the trainer leaves them (config.json holding
the resolved config of the parameters they ran with, status complete, the linear evaluations'
results and a record). The end-to-end study test (`test_notebooks.py`) reruns a really finished
study and checks that nothing is found changed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cclnb import study
from cclnb.commands import cli
from cclnb.errors import ConfigError
from cclnb.study import rerun
from cclnb.study import run as study_run
from cclnb.training import resolve_config
from conftest import study_cli


def finish(plan: study.Study) -> None:
    """Leave every (method, seed) of `plan` as a finished run made with the plan's parameters."""
    for step in plan.steps:
        run_dir = Path(step.parameters.get("run_dir", step.output.parent))
        if step.notebook in ("task_sequence", "untrained"):
            make = study.train_config if step.notebook == "task_sequence" else study.untrained_config
            config = resolve_config(dataclasses.replace(make(step.parameters), seed=step.parameters["seed"]),
                                    32, torch.device("cpu"))
            saved = config.to_dict()
            if step.notebook == "untrained":
                saved["method"] = step.label.split(" seed")[0]
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps({**saved, "git_commit": "abc", "world_size": 1}))
            (run_dir / "status.json").write_text(json.dumps({"state": "complete"}))
        elif step.notebook == "linear_eval":
            probe = step.parameters.get("protocol") == "probe"
            (run_dir / f"lincls_{step.parameters['who']}.json").write_text(json.dumps(
                {"epochs": step.parameters["epochs"], "top1": 50.0,
                 "protocol": "probe: L-BFGS logistic regression on frozen features" if probe else "native 32px"}))
        elif step.notebook == "record":
            step.output.parent.mkdir(parents=True, exist_ok=True)
            step.output.write_text("{}")


def plan(tmp_path: Path, *overrides: str, **options) -> study.Study:
    return study.plan_study("demo", list(overrides), runs_root=tmp_path / "runs", reports_root=tmp_path / "reports",
                            methods=["CCL", "Joint"], seeds=[0, 1], **options)


def test_a_finished_study_rerun_as_it_was_made_finds_nothing_changed(tmp_path: Path) -> None:
    finish(plan(tmp_path))
    again = plan(tmp_path)
    assert all(s.done for s in again.steps if s.notebook in ("task_sequence", "untrained", "linear_eval"))
    assert rerun.changed_runs(again) == {}
    # runtime-only parameters (progress bars, loader workers) change nothing a run computes
    assert rerun.changed_runs(plan(tmp_path, "progress=True", "workers=3")) == {}


def test_a_rerun_with_another_parameter_stops_before_anything_runs(tmp_path: Path, capsys, monkeypatch) -> None:
    """On a finished study, `-p lr=0.05` said "already complete, skipped" for every step, exited 0
    and re-rendered the report from runs made with lr 0.1."""
    finish(plan(tmp_path))
    before = sorted(p for p in tmp_path.rglob("*"))
    for name in ("_launch", "execute_step", "_run_action", "render_html"):
        monkeypatch.setattr(study_run, name, lambda *a, **k: pytest.fail("a step ran"))
    code = cli.main(study_cli(tmp_path, "--preset", "demo", "--methods", "CCL", "Joint", "--seeds", "0", "1",
                              "-p", "lr=0.05",
                              "-p", "linear_eval.epochs=60"))
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and "Traceback" not in err
    assert ("8 finished runs of study 'demo' were made with other parameters than this command's: CCL seed 0, "
            "Joint seed 0, untrained seed 0 and 5 more: lr: they have 0.1, this command 0.05; linear_eval.epochs: "
            "they have 50, this command 60. Nothing was run") in err
    assert "give this command's runs another --study NAME" in err
    assert "add --rerun-changed (the old runs and their records move to " in err and ".replaced" in err
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_rerun_changed_moves_the_old_runs_and_records_aside_and_runs_them_afresh(tmp_path: Path) -> None:
    finish(plan(tmp_path))
    changed = plan(tmp_path, "epochs=2", rerun_changed=True, baseline=False)
    groups = rerun.changed_runs(changed)
    assert sorted(groups) == ["CCL seed 0", "CCL seed 1", "Joint seed 0", "Joint seed 1"]
    assert "epochs: they have 4, this command 2" in groups["CCL seed 0"]
    afresh = rerun.planned_afresh(changed, groups)
    first = next(s for s in afresh.steps if s.label == "CCL seed 0: task sequence")
    assert not first.done and first.parameters["resume"] is None
    assert not any(s.done for s in afresh.steps if s.group in groups)
    moved = rerun.move_aside(afresh, groups, "20261207-120000")
    runs = tmp_path / "runs" / "demo"
    assert moved == [runs / ".replaced" / m / f"seed{k}-20261207-120000" for k in (0, 1) for m in ("CCL", "Joint")]
    for aside in moved:
        assert (aside / "config.json").is_file() and (aside / "record.json").is_file()
    assert not (runs / "CCL" / "seed0").exists() and not (tmp_path / "reports" / "demo" / "runs" / "CCL-seed0.json").exists()
    # the baselines, unchanged, keep their runs and records
    assert (runs / "untrained" / "seed0" / "config.json").is_file()
    assert (tmp_path / "reports" / "demo" / "runs" / "untrained-seed0.json").is_file()
    # nothing left that differs: the command then runs as a fresh study of those pairs
    assert rerun.changed_runs(plan(tmp_path, "epochs=2", baseline=False)) == {}


def test_a_field_the_finished_run_predates_counts_as_its_default(tmp_path: Path) -> None:
    """A run written before a TrainConfig field (or a method option) existed lacks it in config.json:
    it ran as the field's default, so the field differs only where the command asks for another value."""
    finish(plan(tmp_path))
    for config_file in (tmp_path / "runs").rglob("config.json"):
        saved = json.loads(config_file.read_text())
        for later in ("tensorboard", "ccl_extra_weight", "width"):
            saved.pop(later, None)
        config_file.write_text(json.dumps(saved))
    changed = rerun.changed_runs(plan(tmp_path))
    # tensorboard and CCL's option are at their defaults; the demo's width (8) is not the default (64)
    assert set(changed) == {f"{m} seed {k}" for m in ("CCL", "Joint", "untrained", "untrained-bn") for k in (0, 1)}
    assert all(found == ["width: they have 64, this command 8"] for found in changed.values())
