"""Every notebook executed under papermill on tiny real runs (the embedded demo dataset).

One test drives the whole chain in order, because each notebook needs what the previous one left
behind and a module fixture would be rebuilt by every pytest-xdist worker: `cclnb study` runs the
task-sequence and linear-eval (fast probe) notebooks, the untrained baseline, writes the records
and renders the report from them; a second call skips what is finished; then the linear-eval
notebook runs the paper's SGD protocol for one epoch and the exploration notebook runs on the
trained encoder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
import torch

from cclnb import study
from cclnb.training.checkpoint import load_checkpoint
from cclnb.training.precision import cpu_has_native_bf16

# 2 tasks of 5 digit classes, 8 train images per class, 1 epoch, a 64-key queue: seconds per step.
# BatchNorm over 8 samples per group (the default 8 groups would leave 2 of a batch of 16, whose
# statistics can drive the loss to NaN).
TINY = ["subset_per_class=8", "n_tasks=2", "epochs=1", "batch_size=16", "bn_groups=2", "key_bn_groups=2",
        "moco_k=64", "ccl_k=16",
        "n_save=2", "knn_k=5", "progress=False", "linear_eval.subset_per_class=8",
        "linear_eval.progress=False"]


def _run(notebook: str, output: Path, **parameters: object) -> nbformat.NotebookNode:
    papermill.execute_notebook(str(study.notebook_path(notebook)), str(output), parameters=parameters,
                               kernel_name="python3", progress_bar=False, cwd=str(output.parent))
    return nbformat.read(str(output), as_version=4)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_study_notebooks_end_to_end(tmp_path: Path) -> None:
    lines: list[str] = []
    plan = study.plan_study("demo", TINY, runs_root=tmp_path / "runs",
                            reports_root=tmp_path / "reports", methods=["CCL"], seeds=[0])
    html = study.run_study(plan, log=lines.append)
    run_dir = tmp_path / "runs" / "demo" / "CCL" / "seed0"
    # the demo pins bf16: a CPU that only emulates it is told so once, before the first step
    notes = [line for line in lines if line.startswith("note: ")]
    assert [bool(re.match(r"note: precision bf16 on a CPU without native bf16", n)) for n in notes] == \
        ([] if cpu_has_native_bf16() else [True])
    assert lines[len(notes)].startswith("[1/11] CCL seed 0: task sequence ...")
    assert any(line.startswith("[11/11] report ...") for line in lines)

    # task sequence: a complete run directory and the notebook's own figures
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    assert _images(nbformat.read(str(run_dir / "task_sequence.ipynb"), as_version=4)) >= 3
    # linear eval (probe) for student and teacher, in the study's process (the demo's inline_probe)
    for who in ("student", "teacher"):
        result = json.loads((run_dir / f"lincls_{who}.json").read_text())
        assert 10.0 < result["top1"] <= 100.0 and result["protocol"].startswith("probe")
        assert f"final top-1 {result['top1']:.2f}%" in (run_dir / f"linear_eval_{who}.log").read_text()
    # the linear-eval notebook, given the inline step's parameters, writes the same result
    inline = json.loads((run_dir / "lincls_teacher.json").read_text())
    teacher_step = next(s for s in plan.steps if s.label == "CCL seed 0: linear eval (teacher)")
    _run("linear_eval", run_dir / "probe_check.ipynb", **teacher_step.parameters)
    from_notebook = json.loads((run_dir / "lincls_teacher.json").read_text())
    assert {k: v for k, v in from_notebook.items() if k != "time_s"} == {
        k: v for k, v in inline.items() if k != "time_s"}

    # the untrained encoder: same data and seed, evaluated by kNN and the same final probe
    untrained = tmp_path / "runs" / "demo" / "untrained" / "seed0"
    assert json.loads((untrained / "config.json").read_text())["method"] == "untrained"
    assert json.loads((untrained / "lincls_student.json").read_text())["protocol"].startswith("probe")
    # and the same weights with BatchNorm statistics measured on the training images
    calibrated = tmp_path / "runs" / "demo" / "untrained-bn" / "seed0"
    assert json.loads((calibrated / "config.json").read_text())["method"] == "untrained-bn"
    raw, cal = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (untrained, calibrated))
    bn = "encoder_q.backbone.bn1"
    for name in (f"{bn}.weight", f"{bn}.bias", "encoder_q.backbone.conv1.weight"):
        assert torch.equal(raw[name], cal[name])
    assert torch.equal(raw[f"{bn}.running_var"], torch.ones_like(raw[f"{bn}.running_var"]))
    assert not torch.allclose(cal[f"{bn}.running_var"], raw[f"{bn}.running_var"])

    # records: one small JSON per (method, seed), no weights; the report is built from them
    records = tmp_path / "reports" / "demo" / "runs"
    assert sorted(p.name for p in records.iterdir()) == ["CCL-seed0.json", "untrained-bn-seed0.json",
                                                           "untrained-seed0.json"]
    record = json.loads((records / "CCL-seed0.json").read_text())
    assert record["config"]["seed"] == 0 and record["final"]["teacher"]["top1"] > 0
    assert record["provenance"]["git_commit"] and record["provenance"]["torch"]
    assert (records / "CCL-seed0.json").stat().st_size < 50_000

    # report: per-seed and summary CSVs, the verdict, HTML with code hidden and figures embedded
    results = pd.read_csv(tmp_path / "reports" / "demo" / "results.csv")
    assert list(results["method"]) == ["CCL", "untrained", "untrained-bn"] and results.loc[0, "tasks"] == 2
    assert results.loc[0, "linear_top1_teacher"] > 0 and results.loc[0, "state"] == "complete"
    summary = pd.read_csv(tmp_path / "reports" / "demo" / "summary.csv")
    assert list(summary["method"]) == ["CCL", "untrained", "untrained-bn"] and list(summary["n"]) == [1, 1, 1]
    page = html.read_text(encoding="utf-8")
    assert "student top-1" in page and "teacher top-1" in page and "Forgetting curves" in page
    assert "not resolved" in page and "Rule:" in page and "ln(K+1)" in page
    assert len(re.findall(r"data:image/png;base64", page)) >= 4
    assert "load_records" not in page  # code cells are hidden

    # a second call skips the finished steps and only rebuilds the report
    again: list[str] = []
    study.run_study(study.plan_study("demo", TINY, runs_root=tmp_path / "runs", seeds=[0],
                                     reports_root=tmp_path / "reports", methods=["CCL"]), log=again.append)
    assert sum("already complete, skipped" in line for line in again) == 7

    # linear eval with the paper's SGD protocol (1 epoch), curve shown
    nb = _run("linear_eval", run_dir / "lincls_check.ipynb", run_dir=str(run_dir), who="student",
              protocol="lincls", epochs=1, batch_size=32, schedule=[], device="cpu", workers=0,
              subset_per_class=8, progress=False)
    result = json.loads((run_dir / "lincls_student.json").read_text())
    assert result["epochs"] == 1 and len(result["curve"]) == 1 and _images(nb) == 1

    # exploration of the study just run, static: its curves (63db7f0), task split, views, replay
    # picks, embedding
    nb = _run("explore", tmp_path / "explore.ipynb", runs_root=str(tmp_path / "runs"), interactive=False,
              n_views=2, max_points=200)
    assert _images(nb) == 6  # + one CCL step term by term (00a2c42)
