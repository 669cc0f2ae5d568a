"""Seeds, spread and the verdict (`cclnb.study.aggregate`) on synthetic study records.

The records below are TEST FIXTURES with invented numbers (never shipped as results), written
in the record format of `cclnb.study.records` so that the path the report takes (files -> records ->
runs -> per-seed table -> summary, paired differences, verdict) is tested end to end on numbers
whose means, spreads and verdicts are known by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cclnb.errors import DataError
from cclnb.study import aggregate, figures, records, report

CONFIG = {"data": "demo", "dataset": "demo", "n_tasks": 2, "epochs": 3, "arch": "resnet18",
          "image_size": 32, "moco_k": 255, "batch_size": 32, "imagenetsub": False,
          "precision": "bf16", "run_dir": "/somewhere", "progress": True, "workers": 4}


def fixture_record(method: str, seed: int, top1: float, *, config: dict | None = None,
                   R: list[list[float]] | None = None, teacher: float | None = None) -> dict:
    """A record in the `cclnb.study.records` format: `top1` as the student's final linear top-1."""
    R = R or [[50.0 + top1 / 10, 20.0], [40.0, 60.0 + top1 / 10]]
    rows = [[t, e, 2 * t + e + 1, 5.0 - 0.2 * (2 * t + e), 5.0 - 0.2 * (2 * t + e), 0.0, 0.0, 0.03,
             100.0 + seed, 1.0 + 2 * t + e] for t in range(2) for e in range(2)]
    final = {"student": {"top1": top1, "protocol": "probe: L-BFGS", "epochs": 100, "curve": []}}
    if teacher is not None:
        final["teacher"] = {"top1": teacher, "protocol": "probe: L-BFGS", "epochs": 100, "curve": []}
    return {
        "format": records.FORMAT, "study": "fixture", "method": method, "seed": seed,
        "state": "complete",
        "config": {**CONFIG, **(config or {}), "method": method, "seed": seed,
                   "run_dir": f"/runs/{method}/seed{seed}"},
        "final": final,
        "accuracy": {"knn_student": {"after_task": list(range(len(R))),
                                     "columns": ["task_0", "task_1", "all"],
                                     "values": [[*row, sum(row) / 2] for row in R]}},
        "train_loss": {"columns": ["task", "epoch", "global_step", "loss", "loss_moco", "loss_extra",
                                   "loss_distill", "lr", "img_per_s", "time_s"], "rows": rows},
        "throughput": {"median_img_per_s": 100.0 + seed, "train_time_s": 4.0, "steps": 4},
        "provenance": {"git_commit": "0123456789abcdef", "device": "CPU x2",
                       "hardware": {"cpu_count": 2}, "versions": {"torch": "2.x"},
                       "started": "2026-12-01T00:00:00"},
    }


def write_records(folder: Path, *items: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        (folder / records.record_name(item["method"], item["seed"])).write_text(json.dumps(item))
    return folder


def per_seed(folders: list[Path]) -> tuple[pd.DataFrame, list[aggregate.Refusal]]:
    """What the report notebook does: read, refuse the incomparable, tabulate per seed."""
    found = records.load_records(folders)
    kept, refused = aggregate.comparable([(r.source, r.method, r.seed, r.settings) for r in found])
    runs = report.sort_runs([records.as_run(r) for r in found if r.source in kept])
    return report.results_table(runs), refused


# Finetuning 50, 52, 54 (mean 52, sd 2); CCL = Finetuning + 3, 4, 5 per seed (paired mean 4, sd 1)
FT = {0: 50.0, 1: 52.0, 2: 54.0}
CCL_GAIN = {0: 3.0, 1: 4.0, 2: 5.0}


def test_means_spreads_and_paired_differences_are_known(tmp_path: Path) -> None:
    folder = write_records(tmp_path / "runs",
                           *(fixture_record("Finetuning", s, v) for s, v in FT.items()),
                           *(fixture_record("CCL", s, FT[s] + CCL_GAIN[s], teacher=60.0 + s) for s in FT))
    table, refused = per_seed([folder])
    assert not refused and len(table) == 6
    summary = aggregate.summary_table(table).set_index("method")
    assert list(summary.index) == ["Finetuning", "CCL"]        # the paper's baseline first
    ft = summary.loc["Finetuning"]
    assert (ft["n"], ft["seeds"]) == (3, "0 1 2")
    assert ft["linear_top1_student_mean"] == pytest.approx(52.0)
    assert ft["linear_top1_student_std"] == pytest.approx(2.0)      # sample sd (ddof 1)
    assert (ft["linear_top1_student_min"], ft["linear_top1_student_max"]) == (50.0, 54.0)
    assert summary.loc["CCL", "linear_top1_teacher_mean"] == pytest.approx(61.0)
    # forgetting of task 0 = R[0][0] - R[1][0] = 50 + top1/10 - 40, averaged over seeds
    assert ft["avg_forgetting_mean"] == pytest.approx(10.0 + 5.2)
    assert ft["bwt_mean"] == pytest.approx(-(10.0 + 5.2))
    assert ft["final_knn_mean"] == pytest.approx(np.mean([(40 + 60 + v / 10) / 2 for v in FT.values()]))
    paired = aggregate.paired_table(table).set_index("method")
    ccl = paired.loc["CCL"]
    assert (ccl["vs"], ccl["n"], ccl["mean"], ccl["std"], ccl["min"], ccl["max"]) == \
        ("Finetuning", 3, pytest.approx(4.0), pytest.approx(1.0), 3.0, 5.0)
    assert ccl["per_seed"] == "seed 0: +3.00, seed 1: +4.00, seed 2: +5.00"


def test_a_resolved_and_an_unresolved_verdict() -> None:
    def table(gaps: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
        rows = [{"method": "Finetuning", "seed": s, "linear_top1_student": 50.0} for s in range(3)]
        level = {"Finetuning": [50.0] * 3}
        for better, worse in (("SimpleReplay", "Finetuning"), ("CCL", "SimpleReplay"), ("Joint", "CCL")):
            level[better] = [w + g for w, g in zip(level[worse], gaps[(better, worse)])]
            rows += [{"method": better, "seed": s, "linear_top1_student": v}
                     for s, v in enumerate(level[better])]
        return pd.DataFrame(rows)

    # every gap 2 +- 0.5 (mean 2 > 2 sd = 1): the order holds
    steady = {pair: [1.5, 2.0, 2.5] for pair in
              (("SimpleReplay", "Finetuning"), ("CCL", "SimpleReplay"), ("Joint", "CCL"))}
    held = aggregate.verdict(table(steady))
    assert held.outcome == "holds" and [p.status for p in held.pairs] == ["holds"] * 3
    assert held.pairs[0].mean == pytest.approx(2.0) and held.pairs[0].std == pytest.approx(0.5)
    assert "**holds**" in held.line() and "Joint > CCL: holds (mean gap +2.00, sd 0.50" in held.line()
    # CCL vs SimpleReplay: mean 1, sd 1.5 -> gap below twice the spread: not resolved
    noisy = {**steady, ("CCL", "SimpleReplay"): [-0.5, 1.0, 2.5]}
    unresolved = aggregate.verdict(table(noisy))
    assert unresolved.outcome == "not resolved"
    assert [p.status for p in unresolved.pairs] == ["holds", "not resolved", "holds"]
    # a clear reversal anywhere: the order does not hold
    reversed_ = aggregate.verdict(table({**noisy, ("Joint", "CCL"): [-3.0, -2.5, -3.5]}))
    assert reversed_.outcome == "does not hold" and reversed_.pairs[0].status == "reversed"
    assert "2 sd(d)" in aggregate.VERDICT_RULE and "not resolved" in aggregate.VERDICT_RULE


def test_one_seed_is_never_resolved() -> None:
    one = pd.DataFrame([{"method": m, "seed": 0, "linear_top1_student": v}
                        for m, v in zip(aggregate.PAPER_ORDER, (60.0, 55.0, 54.0, 52.0))])
    result = aggregate.verdict(one)
    assert result.outcome == "not resolved"
    assert all(p.status == "not resolved" and p.n == 1 and math.isnan(p.std) for p in result.pairs)
    missing = aggregate.verdict(one[one["method"] != "Joint"])
    assert "no seed run by both" in missing.pairs[0].sentence()
    assert aggregate.mean_spread_text(52.0, math.nan, 52.0, 52.0, 1) == "52.00"
    assert aggregate.mean_spread_text(52.0, 2.0, 50.0, 54.0, 3) == "52.00 ± 2.00 [50.00, 54.00]"


def test_a_record_with_another_config_is_refused_naming_the_field(tmp_path: Path) -> None:
    folder = write_records(tmp_path / "runs", *(fixture_record("Finetuning", s, v) for s, v in FT.items()),
                           fixture_record("Finetuning", 3, 90.0, config={"epochs": 30}))
    table, refused = per_seed([folder])
    assert sorted(table["seed"]) == [0, 1, 2]          # the 30-epoch run is not averaged in
    assert len(refused) == 1 and refused[0].seed == 3
    assert "epochs: 3 vs 30" in refused[0].reason and refused[0].key.endswith("Finetuning-seed3.json")
    # a different final evaluation is another experiment too
    other_eval = fixture_record("Finetuning", 4, 51.0)
    other_eval["final"]["student"]["epochs"] = 30
    _, refused = per_seed([write_records(tmp_path / "more", other_eval), folder])
    assert any(r.seed == 4 and "final_evaluation" in r.reason for r in refused)
    # runtime-only fields (run_dir, workers, progress) and the seed never make records incomparable
    assert aggregate.config_differences({**CONFIG, "seed": 1, "workers": 1}, CONFIG) == []
    # a record written before a field existed ran with its default: comparable with one that names it
    assert aggregate.config_differences({**CONFIG, "width": 64, "train_tasks": None}, CONFIG) == []
    assert aggregate.config_differences({**CONFIG, "width": 16}, CONFIG) == ["width: 16 vs 64"]


def test_records_from_two_folders_merge_and_a_duplicate_seed_is_refused(tmp_path: Path) -> None:
    here = write_records(tmp_path / "here", fixture_record("Finetuning", 0, 50.0),
                         fixture_record("CCL", 0, 53.0))
    other = write_records(tmp_path / "other_machine", fixture_record("Finetuning", 1, 52.0),
                          fixture_record("CCL", 1, 57.0), fixture_record("CCL", 0, 99.0))
    table, refused = per_seed([here, other])
    assert sorted(zip(table["method"], table["seed"])) == [("CCL", 0), ("CCL", 1),
                                                           ("Finetuning", 0), ("Finetuning", 1)]
    assert table[(table["method"] == "CCL") & (table["seed"] == 0)]["linear_top1_student"].item() == 53.0
    assert len(refused) == 1 and "a second result for CCL seed 0" in refused[0].reason
    assert refused[0].key == str(other / "CCL-seed0.json")
    paired = aggregate.paired_table(table).set_index("method")
    assert paired.loc["CCL", "mean"] == pytest.approx(4.0) and paired.loc["CCL", "n"] == 2


def test_summary_and_results_csv(tmp_path: Path) -> None:
    folder = write_records(tmp_path / "runs", *(fixture_record("Finetuning", s, v) for s, v in FT.items()),
                           fixture_record(report.UNTRAINED, 0, 40.0, R=[[45.0, 35.0]]))
    table, _ = per_seed([folder])
    summary = aggregate.summary_table(table)
    written = report.write_results(table, summary, tmp_path / "out")
    assert [p.name for p in written] == ["results.csv", "summary.csv"]
    assert len(pd.read_csv(written[0])) == 4 and list(pd.read_csv(written[1])["method"]) == \
        ["Finetuning", report.UNTRAINED]
    untrained = table[table["method"] == report.UNTRAINED].iloc[0]
    assert untrained["avg_acc"] == pytest.approx(40.0) and math.isnan(untrained["avg_forgetting"])
    assert untrained["final_knn"] == pytest.approx(40.0)
    assert table["chance_loss"].iloc[0] == pytest.approx(math.log(256))
    shown = report.display_summary(summary, table).set_index("method")
    assert shown.loc["Finetuning", "student top-1"] == "52.00 ± 2.00 [50.00, 54.00]"
    assert shown.loc["Finetuning", "ln(K+1)"] == "5.55"


def test_figures_draw_one_panel_per_method_with_the_seed_band(tmp_path: Path) -> None:
    folder = write_records(tmp_path / "runs", *(fixture_record("Finetuning", s, v) for s, v in FT.items()),
                           fixture_record(report.UNTRAINED, 0, 40.0, R=[[45.0, 35.0]]))
    runs = [records.as_run(r) for r in records.load_records([folder])]
    fig = figures.plot_forgetting_curves(runs)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["Finetuning - knn, 3 seeds"]
    assert panels[0].collections, "the min-max band over seeds"
    assert any(line.get_label() == "untrained encoder" for line in panels[0].get_lines())
    loss = [ax for ax in figures.plot_loss_curves(runs).axes if ax.get_title()]
    assert any(line.get_label().startswith("ln(K+1) = 5.55") for line in loss[0].get_lines())
    # the budget axis: images seen from the records (steps x batch), one line per gap
    results = records.study_results([folder])
    assert len(results.runs) == 4 and not results.refused and len(results.table) == 4
    seen = report.images_seen(results.runs)
    assert seen == results.runs[0].train_log["global_step"].max() * CONFIG["batch_size"]
    gaps = aggregate.budget_gaps([(seen, results.table), (2 * seen, results.table)])
    assert len(figures.plot_budget_gaps(gaps).axes[0].get_lines()) >= 1


def test_bad_record_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "CCL-seed0.json").write_text("{\"format\": ")
    with pytest.raises(DataError, match="not valid JSON"):
        records.load_records([tmp_path])
    (tmp_path / "CCL-seed0.json").write_text(json.dumps({"method": "CCL"}))
    with pytest.raises(DataError, match="not a cclnb study record"):
        records.load_records([tmp_path])
    assert records.load_records([tmp_path / "absent"]) == []


def test_the_continual_penalty_is_the_verdicts_precondition_and_forgetting_follows_the_same_rule() -> None:
    """Joint > Finetuning must hold before the order of the other methods says anything about the
    paper; replay's lower forgetting is judged with the verdict's rule (d = FT - replay)."""
    def rows(method: str, top1: list[float], forgetting: list[float] | None = None) -> list[dict]:
        return [{"method": method, "seed": s, "linear_top1_student": v,
                 "avg_forgetting": None if forgetting is None else forgetting[s]} for s, v in enumerate(top1)]

    base = rows("Finetuning", [50.0, 51.0, 52.0], [3.0, 3.2, 2.8]) + rows("SimpleReplay", [51, 52, 53], [1.0, 1.1, 0.9])
    last = pd.DataFrame(base + rows("Joint", [49.0, 50.2, 50.8]))
    penalty = aggregate.continual_penalty(last)
    assert penalty.status == "reversed" and penalty.better == "Joint" and penalty.worse == "Finetuning"
    text = aggregate.verdict_markdown(last)
    assert "cannot be read as evidence about the paper" in text
    assert "SimpleReplay < Finetuning: holds (mean gap +2.00, sd 0.10 over 3 seeds)" in text
    first = pd.DataFrame(base + rows("Joint", [53.0, 54.1, 54.9]))
    assert aggregate.continual_penalty(first).status == "holds"
    assert "is evidence about the paper's claim" in aggregate.verdict_markdown(first)
    # without Joint the precondition is not resolved, and says so
    assert "no seed run by both" in aggregate.penalty_line(aggregate.continual_penalty(pd.DataFrame(base)))


def test_ccl_taken_apart_pairs_each_ablation_against_ccl_and_simplereplay() -> None:
    top1 = {"SimpleReplay": [52.0, 53.0, 54.0], "CCL": [51.0, 52.5, 53.0],
            "CCL-no-distill": [52.5, 53.5, 54.6], "Finetuning": [50.0, 51.0, 52.0]}
    table = pd.DataFrame([{"method": m, "seed": s, "linear_top1_student": v}
                          for m, values in top1.items() for s, v in enumerate(values)])
    ablations = aggregate.comparison_table(table)
    assert list(zip(ablations["method"], ablations["vs"])) == [("CCL-no-distill", "CCL"),
                                                              ("CCL-no-distill", "SimpleReplay")]
    vs_ccl = ablations.iloc[0]
    assert vs_ccl["mean"] == pytest.approx((1.5 + 1.0 + 1.6) / 3) and vs_ccl["status"] == "holds"
    assert ablations.iloc[1]["per_seed"] == "seed 0: +0.50, seed 1: +0.50, seed 2: +0.60"
    assert aggregate.comparison_table(table[table["method"] != "CCL-no-distill"]).empty
    # ablations are rows of the summary, after the paper's methods; never part of the order
    assert aggregate.method_order(list(top1))[-1] == "CCL-no-distill"


def test_the_budget_axis_follows_each_gap_across_budgets() -> None:
    """Three budgets of one study: the continual penalty appears only at the largest; every gap is
    a row per budget with its seed spread and status, ordered by images seen."""
    def table(penalty: list[float]) -> pd.DataFrame:
        top1 = {"Finetuning": [50.0, 51.0, 52.0], "SimpleReplay": [50.5, 51.6, 52.4], "CCL": [50.4, 51.7, 52.2]}
        top1["Joint"] = [f + p for f, p in zip(top1["Finetuning"], penalty)]
        return pd.DataFrame([{"method": m, "seed": s, "linear_top1_student": v}
                             for m, values in top1.items() for s, v in enumerate(values)])

    gaps = aggregate.budget_gaps([(4e5, table([1.0, 1.2, 0.9])), (1e5, table([-1.0, -0.8, -1.2])),
                                  (2e5, table([0.1, -0.2, 0.2]))])
    penalty = gaps[gaps["gap"] == "Joint - Finetuning"]
    assert penalty["images_seen"].tolist() == [1e5, 2e5, 4e5]
    assert penalty["status"].tolist() == ["reversed", "not resolved", "holds"]
    assert penalty["mean"].iloc[0] == pytest.approx(-1.0)
    assert set(gaps["gap"]) == {"Joint - Finetuning", "SimpleReplay - Finetuning", "CCL - SimpleReplay"}
    assert len(gaps) == 9
    # a budget that lacks a method gives an empty gap marked "not run" rather than an error
    partial = aggregate.budget_gaps([(1e5, table([1, 1, 1])[lambda t: t["method"] != "CCL"])])
    missing = partial[partial["gap"] == "CCL - SimpleReplay"]
    assert missing["n"].item() == 0 and missing["status"].item() == "not run"
    assert partial.loc[partial["gap"] == "Joint - Finetuning", "status"].item() == "holds"
    # one sentence per budget, in order, that restates its rows and what they resolve
    lines = aggregate.budget_sentences(gaps, {1e5: 4, 2e5: 8}).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("- **4 epochs per task (100,000 images per method)**: Joint - Finetuning -1.00 "
                               "(3 seeds, reversed); SimpleReplay - Finetuning +0.50 (3 seeds, holds);")
    assert lines[0].endswith("Resolved: Finetuning > Joint (reversed), SimpleReplay > Finetuning.")
    assert lines[2].startswith("- **400,000 images per method**: Joint - Finetuning +1.03 (3 seeds, holds)")
    assert "Resolved: Joint > Finetuning, SimpleReplay > Finetuning." in lines[2]
    assert aggregate.budget_sentences(partial).endswith(
        "CCL - SimpleReplay not run. Resolved: Joint > Finetuning, SimpleReplay > Finetuning.")


def test_the_budget_trend_says_where_each_gap_heads_and_crosses() -> None:
    """A gap that rises one point per doubling from -2 crosses zero two doublings past the largest
    budget; one above zero that shrinks heads away from the paper; a gap on one budget has no line."""
    rows = [{"images_seen": x, "gap": "Joint - Finetuning", "n": n, "mean": m}
            for x, n, m in ((1e5, 3, -4.0), (2e5, 5, -3.0), (4e5, 1, -2.0))]
    rows += [{"images_seen": x, "gap": "CCL - SimpleReplay", "n": 3, "mean": m} for x, m in ((1e5, 1.0), (4e5, 0.5))]
    rows += [{"images_seen": 4e5, "gap": "SimpleReplay - Finetuning", "n": 3, "mean": 0.7}]
    trend = aggregate.budget_trend(pd.DataFrame(rows)).set_index("gap")
    penalty = trend.loc["Joint - Finetuning"]
    assert penalty["per_doubling"] == pytest.approx(1.0)
    assert penalty["heading"] == "toward the paper"
    assert penalty["crosses_at"] == pytest.approx(1.6e6)
    ccl = trend.loc["CCL - SimpleReplay"]
    assert ccl["per_doubling"] == pytest.approx(-0.25) and ccl["heading"] == "away from the paper"
    assert ccl["crosses_at"] == pytest.approx(4e5 * 4)
    single = trend.loc["SimpleReplay - Finetuning"]
    assert single["heading"] == "one budget" and math.isnan(single["crosses_at"])
    text = aggregate.budget_trend_markdown(trend.reset_index())
    assert "**Joint - Finetuning**: -2.00 at the largest budget (1 seed), +1.00 per doubling" in text
    assert "**CCL - SimpleReplay**: +0.50 at the largest budget (3 seeds)" in text
    assert "1,600,000 images per method (4.0x the largest budget run)" in text
    # a gap moving further from zero never gets a crossing
    rising = aggregate.budget_trend(pd.DataFrame([{"images_seen": x, "gap": "g", "n": 2, "mean": m}
                                                  for x, m in ((1e5, 0.5), (2e5, 1.0))]))
    assert rising["heading"].item() == "stays on the paper's side" and math.isnan(rising["crosses_at"].item())


def test_a_method_beyond_the_paper_is_paired_against_finetuning_and_ccl_and_judged_on_forgetting() -> None:
    top1 = {"Finetuning": [50.0, 51.0, 52.0], "CCL": [51.0, 52.5, 53.0], "MyMethod": [53.0, 54.0, 55.5],
            report.UNTRAINED: [40.0, 41.0, 42.0]}    # a baseline row: neither compared nor judged on forgetting
    table = pd.DataFrame([{"method": m, "seed": s, "linear_top1_student": v, "avg_forgetting": 10.0 - v / 10}
                          for m, values in top1.items() for s, v in enumerate(values)])
    pairs = aggregate.comparison_table(table, variants={})
    assert list(zip(pairs["method"], pairs["vs"])) == [("MyMethod", "Finetuning"), ("MyMethod", "CCL")]
    assert pairs.iloc[0]["mean"] == pytest.approx(3.0 + 0.5 / 3) and pairs.iloc[0]["status"] == "holds"
    against = aggregate.forgetting_verdicts(table, variants={})
    assert [(p.better, p.worse) for p in against] == [("CCL", "Finetuning"), ("MyMethod", "Finetuning")]


def test_options_of_other_methods_do_not_make_records_incomparable() -> None:
    """Records written before methods declared their options hold CCL's in every method's config;
    a Finetuning record of today has none. Both are the same experiment."""
    old = {"method": "Finetuning", "lr": 0.1, "seed": 0, "ccl_k": 256, "ccl_distill": True}
    new = {"method": "Finetuning", "lr": 0.1, "seed": 1, "method_module": None}
    assert aggregate.config_differences(old, new) == []
    assert aggregate.config_differences(old, {**new, "method_options": {}}) == []
    ccl_old = {"method": "CCL", "lr": 0.1, "ccl_k": 256}
    assert aggregate.config_differences(ccl_old, {"method": "CCL", "lr": 0.1, "ccl_k": 128}) == ["ccl_k: 256 vs 128"]
    # a record of today holds the method's options under `method_options`: the same names, compared
    ccl_new = {"method": "CCL", "lr": 0.1, "method_module": None, "method_options": {"ccl_k": 256}}
    assert aggregate.config_differences(ccl_old, ccl_new) == []
    assert aggregate.config_differences(ccl_old, {**ccl_new, "method_options": {"ccl_k": 128}}) == ["ccl_k: 256 vs 128"]
