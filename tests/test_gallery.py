"""The pages built from study records: relative paths in records (and their migration), the
findings and the opening figure of a report page, the gallery (`reports/index.html`) and the
results tables of README.md and docs/*.md that a test keeps in step with the records.

Synthetic records are TEST FIXTURES with invented numbers (`test_aggregate.fixture_record`); the
two tests named `committed` read the repository's own records and pages.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from matplotlib.collections import PathCollection

from cclnb.commands.cli import main
from cclnb.errors import ConfigError, DataError
from cclnb.study import figures, findings, gallery, records, report, tables
from test_aggregate import FT, fixture_record, per_seed, write_records
from test_report import R_FINETUNE, write_fixture_run

REPO = Path(__file__).resolve().parents[1]


def _study(folder: Path, epochs: int, penalty: float = 1.0, classes: str | None = None) -> Path:
    """A study of Finetuning, Joint (Finetuning + `penalty` + seed/10) and both baselines, seeds 0-2;
    its runs take `epochs` times the fixture's steps (the images seen of the budget axis); `classes`:
    the class set it trains on (a replication's only difference)."""
    config = {"epochs": epochs, "classes": classes}
    made = [*(fixture_record("Finetuning", s, v, config=config) for s, v in FT.items()),
            *(fixture_record("Joint", s, v + penalty + s / 10, config=config) for s, v in FT.items()),
            *(fixture_record(b, s, 40.0 + s, config=config) for b in report.BASELINES for s in FT)]
    for record in made:
        for row in record["train_loss"]["rows"]:
            row[2] *= epochs                                   # global_step
    write_records(folder / records.RECORDS_FOLDER, *made)
    return folder


# ----------------------------------------------------------------------------- records' paths
def test_records_hold_paths_relative_to_the_run_root_and_old_ones_still_load(tmp_path: Path) -> None:
    run_dir = write_fixture_run(tmp_path / "runs" / "st" / "Finetuning", "seed0", R_FINETUNE,
                                top1={"student": 50.0},
                                extra_config={"method": "Finetuning", "data": str(tmp_path / "data" / "x.zip"),
                                              "run_dir": str(tmp_path / "runs" / "st" / "Finetuning" / "seed0")})
    written = records.write_record(run_dir, tmp_path / "reports" / "runs", "st")
    config = json.loads(written.read_text())["config"]
    assert (config["run_dir"], config["data"]) == ("st/Finetuning/seed0", "../data/x.zip")
    assert str(tmp_path) not in written.read_text()            # no machine's folder in the record

    # a record written before: absolute paths, read as if migrated, then migrated once
    old = fixture_record("Finetuning", 0, 50.0, config={"data": "/data/x.zip"})
    old["config"]["run_dir"] = "/home/me/cclnb/runs/st/Finetuning/seed0"
    folder = write_records(tmp_path / "old", old)
    loaded = records.load_records([folder])[0]
    assert (loaded.config["run_dir"], loaded.config["data"]) == ("st/Finetuning/seed0", "../../../../data/x.zip")
    before = json.loads((folder / "Finetuning-seed0.json").read_text())
    assert records.migrate_records([folder]) == [folder / "Finetuning-seed0.json"]
    after = json.loads((folder / "Finetuning-seed0.json").read_text())
    assert after["config"] == loaded.config and {k: v for k, v in after.items() if k != "config"} == \
        {k: v for k, v in before.items() if k != "config"}
    assert records.migrate_records([folder]) == []             # re-runnable: nothing left to do
    # an old and a migrated record of the same experiment stay comparable
    other = fixture_record("Finetuning", 1, 52.0, config={"data": "/data/x.zip"})
    other["config"]["run_dir"] = "/home/me/cclnb/runs/st/Finetuning/seed1"
    table, refused = per_seed([folder, write_records(tmp_path / "older", other)])
    assert not refused and sorted(table["seed"]) == [0, 1]


def test_cclnb_report_migrate_rewrites_every_study_folder(tmp_path: Path, capsys) -> None:
    old = fixture_record("CCL", 0, 50.0)
    old["config"]["run_dir"] = "/abs/runs/st/CCL/seed0"
    write_records(tmp_path / "st" / "runs", old)
    assert main(["report", "migrate", "--reports-root", str(tmp_path)]) == 0
    assert "migrated 1 records" in capsys.readouterr().out
    assert json.loads((tmp_path / "st" / "runs" / "CCL-seed0.json").read_text())["config"]["run_dir"] == "st/CCL/seed0"


# ----------------------------------------------------------------------------- a report page's opening
def test_findings_count_runs_above_baselines_and_split_pairs_by_the_rule(tmp_path: Path) -> None:
    table, _ = per_seed([_study(tmp_path, epochs=3, penalty=1.0) / records.RECORDS_FOLDER])
    lines = findings.against_baselines(table)
    # margins over the baseline of the same seed (40 + seed): Finetuning 10, 11, 12; Joint 11, 12.1, 13.2
    assert lines[0] == "6 of 6 trained runs end above the untrained encoder as built of their seed (+10.00 to +13.20 points)."
    assert len(lines) == 2 and lines[1].startswith("6 of 6 trained runs end above the untrained-bn encoder")
    shows, cannot = findings.shows_and_cannot(table, [fixture_record("Finetuning", 0, 0)["config"]])
    # Joint - Finetuning = 1.0, 1.1, 1.2 per seed: mean 1.1 > 2 x sd 0.1, so the penalty holds
    assert any(line.startswith("Joint > Finetuning (the continual penalty): holds (+1.10, sd 0.10; "
                               "Joint above at 3 of 3 seeds)") for line in shows)
    assert not any("without a resolved continual penalty" in line for line in cannot)
    assert any("3 seeds per method" in line for line in cannot)
    assert any("the paper's is ImageNet-Sub" in line for line in cannot)
    # a penalty within the spread is something the study cannot show, and the page says why
    flat, _ = per_seed([_study(tmp_path / "flat", epochs=3, penalty=-0.1) / records.RECORDS_FOLDER])
    shows, cannot = findings.shows_and_cannot(flat, [])
    assert any(line.startswith("Joint > Finetuning (the continual penalty): not resolved") for line in cannot)
    assert any("without a resolved continual penalty" in line for line in cannot)
    one_seed = flat[(flat["seed"] == 0) & (flat["method"] != "Joint")]     # Finetuning 50 against 40
    shows, cannot = findings.shows_and_cannot(one_seed, [])
    assert shows[0] == "1 of 1 trained runs end above the untrained encoder as built of their seed (+10.00 points)."
    assert "1 seed per method, and the rule needs at least 2 paired seeds" in cannot[-1]
    page = findings.findings_markdown(flat, [], notes="# A title\n\nWritten once: why.")
    assert page.endswith("Written once: why.") and "# A title" not in page


def test_the_opening_figure_has_a_dot_per_seed_and_a_line_per_baseline(tmp_path: Path) -> None:
    table, _ = per_seed([_study(tmp_path, epochs=3) / records.RECORDS_FOLDER])
    ax = figures.plot_final_top1(table).axes[0]
    dots = [len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)]
    assert dots == [3, 3]                                      # Finetuning and Joint, three seeds each
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Finetuning", "Joint"]
    levels = sorted(round(line.get_ydata()[0], 2) for line in ax.get_lines())
    assert levels == [41.0, 41.0]                              # both baselines: mean of 40, 41, 42
    with pytest.raises(DataError, match="no trained run"):
        figures.plot_final_top1(table[table["method"].isin(report.BASELINES)])


# ----------------------------------------------------------------------------- the gallery
def test_the_gallery_lists_each_study_and_draws_the_budget_axis(tmp_path: Path) -> None:
    _study(tmp_path / "small", epochs=3)
    _study(tmp_path / "large", epochs=6, penalty=2.0)
    (tmp_path / "large" / findings.NOTES).write_text("# Twice the epochs\n\nJudgement.\n")
    (tmp_path / "empty" / "runs").mkdir(parents=True)          # no records: not a study
    page = gallery.write_index(tmp_path).read_text()
    rows = re.findall(r"<tr><td>(.*?)</td></tr>", page)
    assert len(rows) == 2 and 'href="large/index.html"' in rows[0] and "Twice the epochs" in rows[0]
    assert "6 epochs/task" in rows[0] and "holds (+2.10, sd 0.10, 3 seeds)" in rows[0]
    assert page.count("data:image/png;base64,") == 1           # the two studies differ only in epochs
    assert (gallery.seeds_text([0, 1, 2]), gallery.seeds_text([0, 2]), gallery.seeds_text([])) == ("0-2", "0 2", "-")


def locally_changed_studies() -> set[str]:
    """Studies whose records differ from the committed ones in this checkout (`make study` re-measures
    the demo, whose floats differ on another CPU): the committed pages describe the committed records."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "reports"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {Path(line[3:]).parts[1] for line in out.splitlines()
            if len(Path(line[3:]).parts) > 3 and Path(line[3:]).parts[2] == records.RECORDS_FOLDER}


def test_the_committed_gallery_lists_every_committed_study() -> None:
    folders = gallery.study_folders(REPO / "reports")
    page = (REPO / "reports" / gallery.GALLERY).read_text(encoding="utf-8")
    assert len(folders) == len(re.findall(r"<tr><td>", page)), "reports/index.html misses a study: run `cclnb report index`"
    changed = locally_changed_studies()
    for folder in folders:
        assert f'href="{folder.name}/index.html"' in page
        if folder.name not in changed:
            assert gallery.row_html(gallery.study_entry(folder)) in page, \
                f"reports/index.html is stale for {folder.name}: run `cclnb report index`"


# ----------------------------------------------------------------------------- tables in the docs
def test_the_committed_readme_and_docs_match_the_records() -> None:
    pages = tables.pages(REPO)
    assert REPO / "README.md" in pages, "the README's headline table must come from the records"
    stale = tables.stale(pages, REPO / "reports")
    changed = locally_changed_studies()
    if stale and changed and all(any(f" {s} " in f" {m['args']} " for m in tables.BLOCK.finditer(p.read_text())
                                     for s in changed) for p in stale):
        pytest.skip(f"records changed in this checkout ({', '.join(sorted(changed))}): the pages describe the committed ones")
    assert stale == [], "a page's results disagree with the records: run `cclnb report tables`"


def test_a_changed_record_makes_its_table_stale(tmp_path: Path) -> None:
    _study(tmp_path / "reports" / "st", epochs=3)
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("Intro.\n\n<!-- cclnb:summary st -->\nold numbers\n<!-- /cclnb -->\n\n"
                    "<!-- cclnb:verdict st -->\n<!-- /cclnb -->\nEnd.\n")
    assert tables.write([page], tmp_path / "reports") == [page]
    text = page.read_text()
    assert "| Finetuning | 0-2 | 52.00 ± 2.00 |" in text and text.endswith("<!-- /cclnb -->\nEnd.\n")
    assert "(../reports/st/index.html)" in text and "penalty (Joint > Finetuning): **holds" in text
    assert tables.stale([page], tmp_path / "reports") == []
    record = tmp_path / "reports" / "st" / "runs" / "Finetuning-seed1.json"
    data = json.loads(record.read_text())
    data["final"]["student"]["top1"] = 60.0
    record.write_text(json.dumps(data))
    assert tables.stale([page], tmp_path / "reports") == [page]
    assert main(["report", "tables", str(page), "--check", "--reports-root", str(tmp_path / "reports")]) == 1
    with pytest.raises(ConfigError, match="unknown table kind"):
        tables.update_text("<!-- cclnb:bogus st -->\n<!-- /cclnb -->", tables.Studies(tmp_path / "reports"), tmp_path)


def test_the_comparisons_table_pairs_a_method_beyond_the_paper_with_finetuning(tmp_path: Path) -> None:
    folder = _study(tmp_path / "st", epochs=3)
    write_records(folder / records.RECORDS_FOLDER,
                  *(fixture_record("NewMethod", s, v + 2.0 + s / 10, config={"epochs": 3}) for s, v in FT.items()))
    text = tables.render_block("comparisons", ["st"], tables.Studies(tmp_path), tmp_path)
    lines = text.split("\n")
    assert lines[0] == "| comparison | mean gap (sd) | per seed | verdict |"
    assert lines[2] == "| NewMethod > Finetuning | +2.10 (0.10) | 0: +2.00, 1: +2.10, 2: +2.20 | holds |"
    assert len(lines) == 5 and "(st/index.html)" in lines[-1]                # no CCL here: one pair


def test_the_budget_table_follows_each_gap_across_studies(tmp_path: Path) -> None:
    _study(tmp_path / "a", epochs=3, penalty=1.0)
    _study(tmp_path / "b", epochs=6, penalty=-0.5)
    studies = tables.Studies(tmp_path)
    text = tables.render_block("budget", ["b", "a"], studies, tmp_path)
    header, _, penalty, replay, _ = text.split("\n", 4)
    assert header.startswith("| gap | 3 epochs/task") and "| 6 epochs/task" in header
    assert penalty.startswith("| Joint - Finetuning | **+1.10 (0.10), n 3, holds** | **-0.40 (0.10), n 3, reversed** |")
    assert replay.startswith("| SimpleReplay - Finetuning | not run | not run |")
    words = tables.render_block("axis", ["b", "a"], studies, tmp_path)
    low, high = words.split("\n")[:2]
    assert low.startswith("- **3 epochs per task (") and "Joint - Finetuning +1.10 (3 seeds, holds)" in low
    assert low.endswith("Resolved: Joint > Finetuning.")
    assert high.startswith("- **6 epochs per task (") and high.endswith("Resolved: Finetuning > Joint (reversed).")
    with pytest.raises(ConfigError, match="names two or more studies"):
        tables.render_block("axis", ["a"], studies, tmp_path)


def test_the_replication_table_says_whether_each_verdict_carries_over_to_other_classes(tmp_path: Path) -> None:
    _study(tmp_path / "main", epochs=3, penalty=1.0)
    _study(tmp_path / "same", epochs=3, penalty=0.5, classes="101-200")
    _study(tmp_path / "flat", epochs=3, penalty=0.0, classes="101-200")
    _study(tmp_path / "turned", epochs=3, penalty=-0.5, classes="101-200")
    _study(tmp_path / "longer", epochs=6, penalty=1.0, classes="101-200")
    studies = tables.Studies(tmp_path)

    def penalty_row(other: str) -> str:
        text = tables.render_block("replication", ["main", other], studies, tmp_path)
        header, _, penalty, replay = text.split("\n")[:4]
        assert header.startswith("| gap | main (") and f"| {other} (" in header and "seeds 0-2" in header
        assert replay.startswith("| SimpleReplay - Finetuning | not run | not run | not run |")
        return penalty

    assert penalty_row("same") == ("| Joint - Finetuning | **+1.10 (0.10), n 3, holds** | "
                                   "**+0.60 (0.10), n 3, holds** | replicates |")
    assert penalty_row("flat").endswith("| +0.10 (0.10), n 3 | one set only |")
    assert penalty_row("turned").endswith("| **-0.40 (0.10), n 3, reversed** | contradicts |")
    with pytest.raises(ConfigError, match="also differ in epochs: 3 vs 6"):
        tables.render_block("replication", ["main", "longer"], studies, tmp_path)
