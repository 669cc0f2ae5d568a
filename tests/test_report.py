"""cclnb.study.report against run directories written by hand to the documented contract.

The fixture below is a TEST FIXTURE (invented numbers, never shipped as results): it writes the
files of docs/architecture.md ("Run directory") so the reader is tested against the contract
itself, independently of the trainer. The notebook tests exercise the same code on real runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cclnb.errors import DataError
from cclnb import study
from cclnb.study import figures, report

# R[i][j]: accuracy on task j after task i (fixture values chosen so the metrics are easy by hand)
R_FINETUNE = np.array([[60.0, 20.0, 10.0], [40.0, 70.0, 15.0], [30.0, 50.0, 80.0]])


def write_fixture_run(root: Path, method: str, R: np.ndarray, *, state: str = "complete",
                      top1: dict[str, float] | None = None, data: str = "demo",
                      extra_config: dict | None = None) -> Path:
    """A run directory following the contract, with the matrix `R` and a small train log."""
    run_dir = root / method
    (run_dir / "eval").mkdir(parents=True)
    n = R.shape[1]
    config = {"method": method, "data": data, "dataset": "demo" if data == "demo" else "zip",
              "n_tasks": n, "epochs": 1, "arch": "resnet18", "image_size": 32, "moco_k": 64,
              "batch_size": 8, "imagenetsub": False, "precision": "fp32", "seed": 0,
              "git_commit": "0123456789abcdef", "versions": {"torch": "2.x"},
              "hardware": {"cpu_count": 2}, "started": "2026-11-30T00:00:00",
              **(extra_config or {})}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "status.json").write_text(json.dumps({"state": state, "task": R.shape[0] - 1}))
    lines = ["task,epoch,step,global_step,loss,loss_moco,loss_extra,loss_distill,lr,img_per_s,time_s"]
    for step in range(6 * R.shape[0]):
        task = step // 6
        lines.append(f"{task},0,{step % 6},{step},{5 - 0.1 * step},{5 - 0.1 * step},0,0,0.03,"
                     f"{100 + step},{0.5 * (step + 1)}")
    (run_dir / "train_log.csv").write_text("\n".join(lines) + "\n")
    header = "after_task," + ",".join(f"task_{j}" for j in range(n)) + ",all"
    rows = [f"{i}," + ",".join(f"{v:.4f}" for v in R[i]) + f",{R[i].mean():.4f}"
            for i in range(R.shape[0])]
    (run_dir / "eval" / "acc_knn_student.csv").write_text("\n".join([header, *rows]) + "\n")
    for who, value in (top1 or {}).items():
        (run_dir / f"lincls_{who}.json").write_text(json.dumps(
            {"top1": value, "top5": value + 20, "best_top1": value + 1, "best_epoch": 2, "epochs": 3,
             "protocol": "native 32px: RandomResizedCrop(32, 0.08-1)+flip / full image",
             "curve": [{"epoch": e, "top1": value - 3 + e, "loss": 2.0 / e} for e in (1, 2, 3)]}))
    return run_dir


@pytest.fixture()
def study_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs" / "fixture"
    write_fixture_run(root, "CCL", R_FINETUNE + 5, top1={"student": 41.0, "teacher": 43.5})
    write_fixture_run(root, "Finetuning", R_FINETUNE, top1={"student": 38.25})
    write_fixture_run(root, "SimpleReplay", R_FINETUNE[:2], state="interrupted")
    return root


def test_load_runs_orders_by_method_and_reads_every_file(study_root: Path) -> None:
    runs = report.load_runs(study_root.parent)
    assert [r.method for r in runs] == ["Finetuning", "SimpleReplay", "CCL"]
    ccl = runs[2]
    assert ccl.complete and ccl.dataset == "demo-shapes"
    assert set(ccl.lincls) == {"student", "teacher"}
    np.testing.assert_allclose(report.accuracy_matrix(ccl), R_FINETUNE + 5)
    assert len(ccl.train_log) == 18


def test_results_table_metrics_match_hand_computation(study_root: Path) -> None:
    table = report.results_table(report.load_runs(study_root)).set_index("method")
    ft = table.loc["Finetuning"]
    # average accuracy = mean(30, 50, 80); forgetting = mean(60-30, 70-50); BWT = -forgetting here
    assert ft["avg_acc"] == pytest.approx(160 / 3)
    assert ft["avg_forgetting"] == pytest.approx(25.0)
    assert ft["bwt"] == pytest.approx(-25.0)
    assert ft["linear_top1_student"] == 38.25 and math.isnan(ft["linear_top1_teacher"])
    assert table.loc["CCL", "linear_top1_teacher"] == 43.5
    # the interrupted run is summarised over its square part (2 tasks)
    sr = table.loc["SimpleReplay"]
    assert sr["state"] == "interrupted" and sr["avg_acc"] == pytest.approx(55.0)
    assert sr["avg_forgetting"] == pytest.approx(20.0)
    assert table.loc["CCL", "paper_top1"] == 55.48
    assert table.loc["Finetuning", "authors_code_top1"] == 53.06
    assert table["paper_setting"].str.startswith("different").all()


def test_display_table_labels_the_published_numbers_setting(study_root: Path) -> None:
    shown = report.display_table(report.results_table(report.load_runs(study_root)))
    assert "paper top-1 (ImageNet-Sub R50, different setting)" in shown.columns
    assert "avg acc (knn)" in shown.columns
    assert list(shown["final eval"]) == ["lincls", "-", "lincls"]


def test_joint_learns_every_task_at_once(tmp_path: Path) -> None:
    """Joint has one training phase (one matrix row) covering all tasks' classes."""
    write_fixture_run(tmp_path, "Joint", np.array([[50.0, 70.0, 90.0]]))
    runs = report.load_runs(tmp_path)
    row = report.results_table(runs).iloc[0]
    assert row["avg_acc"] == pytest.approx(70.0) and math.isnan(row["avg_forgetting"])
    lines = figures.plot_forgetting_curves(runs).axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [1, 1, 1]  # every task solid at step 1


def test_paper_setting_is_recognised_only_when_it_matches(tmp_path: Path) -> None:
    same = {"imagenetsub": True, "arch": "resnet50", "n_tasks": 10, "epochs": 200, "image_size": 224}
    write_fixture_run(tmp_path, "CCL", R_FINETUNE, data="/data/imagenet", extra_config=same)
    run = report.load_runs(tmp_path)[0]
    assert run.dataset == "imagenet-sub"
    assert report.results_table([run]).loc[0, "paper_setting"] == "same"
    assert not report.matches_paper_setting({**same, "epochs": 100})


def test_write_results_writes_the_per_seed_and_summary_csv(study_root: Path, tmp_path: Path) -> None:
    from cclnb.study.aggregate import summary_table

    table = report.results_table(report.load_runs(study_root))
    written = report.write_results(table, summary_table(table), tmp_path / "out")
    assert [p.name for p in written] == ["results.csv", "summary.csv"]
    back = __import__("pandas").read_csv(tmp_path / "out" / "results.csv")
    assert list(back["method"]) == ["Finetuning", "SimpleReplay", "CCL"] and list(back["seed"]) == [0] * 3


def test_figures_have_one_panel_per_run(study_root: Path) -> None:
    runs = report.load_runs(study_root)
    for make in (figures.plot_forgetting_curves, figures.plot_accuracy_heatmaps, figures.plot_loss_curves):
        fig = make(runs)
        visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
        assert [ax.get_title().split(" - ")[0] for ax in visible] == [r.method for r in runs], make
    assert figures.plot_throughput(runs).axes[0].containers  # bars drawn
    curve = report.lincls_curve(runs[2].lincls["student"])
    assert list(curve["top1"]) == [39.0, 40.0, 41.0]
    assert figures.plot_lincls_curve(runs[2].lincls["student"]).axes
    panels = [ax for ax in figures.plot_lincls_curves(runs).axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["Finetuning", "CCL"]  # SimpleReplay has no result


def test_provenance_and_limits_name_the_setting(study_root: Path) -> None:
    runs = report.load_runs(study_root)
    prov = report.provenance_table(runs)
    assert list(prov["git_commit"]) == ["0123456789"] * 3
    assert prov.loc[0, "train_time_min"] == pytest.approx(9.0 / 60)
    note = report.limits_note(runs)
    assert "demo-shapes" in note and "not complete" in note and "different setting" in note
    assert report.config_table(runs).shape[1] == 3
    # a folder outside the repository is shown as it is; one inside, relative to the repository
    assert prov.loc[0, "source"] == str(runs[0].path)
    assert report.shown_path(study.REPO_ROOT / "reports" / "demo" / "runs") == "reports/demo/runs"


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        report.load_runs(tmp_path / "missing")
    with pytest.raises(DataError, match="no run directories"):
        report.load_runs(tmp_path)
    with pytest.raises(DataError, match="no config.json"):
        report.load_run(tmp_path)
    run_dir = write_fixture_run(tmp_path, "CCL", R_FINETUNE)
    (run_dir / "status.json").write_text("{\"state\": ")
    with pytest.raises(DataError, match="not valid JSON"):
        report.load_run(run_dir)
    with pytest.raises(DataError, match=r"\(N, H, W, 3\)"):
        figures.image_grid(np.zeros((4, 4)))


def test_image_grid_accepts_both_layouts() -> None:
    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    fig = figures.image_grid(images, titles=list("abcde"), n_cols=3, title="grid")
    assert sum(len(ax.images) for ax in fig.axes) == 5
    fig_chw = figures.image_grid(images.transpose(0, 3, 1, 2), n_cols=5)
    assert fig_chw.axes[0].images[0].get_array().shape == (8, 8, 3)
