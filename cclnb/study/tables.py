"""Results in the README and docs that cannot go stale: written from the records between markers.

A page holds a block such as

    <!-- cclnb:summary tin100-32-cpu-w16 -->
    (generated: do not edit)
    <!-- /cclnb -->

and `cclnb report tables` rewrites everything between the two markers from the records in
`reports/<study>/runs/`. `tests/test_gallery.py` fails when a committed page and its records
disagree, so a record changed or added without rewriting the page is caught. The kinds:

- `summary STUDY`: per method, seeds and mean ± sd of the final top-1 (student, teacher), the final
  kNN and the average forgetting, with the published ImageNet-Sub numbers beside them;
- `verdict STUDY`: the verdict on the paper's order and its precondition, with a link to the report;
- `gaps STUDY`: the verdict's pairs (and replay against forgetting), mean gap, sd, per seed, status;
- `comparisons STUDY`: the same for the pairs beyond the paper's order (a method outside it against
  Finetuning and CCL, an ablation against its method and SimpleReplay);
- `budget STUDY STUDY ...`: the budget axis, each gap per study and its trend per doubling;
- `axis STUDY STUDY ...`: the same axis in words, a sentence per budget (the README's headline);
- `replication STUDY STUDY ...`: the same gaps in studies that differ only in their classes, and
  whether each verdict carries over from one class set to the other.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from cclnb.errors import ConfigError, DataError
from cclnb.study import aggregate, gallery, records, report
from cclnb.training.runs import _atomic_write_text

BLOCK = re.compile(r"(?P<open><!-- cclnb:(?P<kind>[a-z]+) (?P<args>[^>]*?) -->\n)(?P<body>.*?)(?P<close><!-- /cclnb -->)",
                   re.S)
DEFAULT_PAGES = ("README.md", "docs/*.md")


class Studies:
    """Study results read once per run of the command (several blocks name the same study)."""

    def __init__(self, reports_root: str | Path) -> None:
        self.root = Path(reports_root).resolve()
        self._entries: dict[str, gallery.StudyEntry] = {}

    def __getitem__(self, study: str) -> gallery.StudyEntry:
        if study not in self._entries:
            folder = self.root / study
            if not records.record_files([folder / records.RECORDS_FOLDER]):
                raise DataError(f"a table names study {study!r}, but {folder / records.RECORDS_FOLDER} holds no "
                                f"records; fix the marker's study name or commit the study's records")
            self._entries[study] = gallery.study_entry(folder)
        return self._entries[study]


def _num(value: float, sign: bool = False) -> str:
    return "-" if not math.isfinite(value) else (f"{value:+.2f}" if sign else f"{value:.2f}")


def _mean_sd(values: Sequence[float]) -> str:
    stats = aggregate.spread(values)
    if stats["n"] == 0:
        return "-"
    return _num(stats["mean"]) + (f" ± {stats['std']:.2f}" if stats["n"] > 1 else "")


def _protocol(table: pd.DataFrame) -> str:
    protocols = table["linear_protocol"].dropna().astype(str)
    return "probe" if len(protocols) and protocols.iloc[0].startswith("probe") else "linear"


def summary_block(entry: gallery.StudyEntry, link: str) -> str:
    """Per method: seeds and mean ± sd over seeds, beside the published numbers."""
    table = entry.results.table
    word = _protocol(table)
    lines = [f"| method | seeds | {word} top-1, student | teacher | final kNN | avg forgetting "
             f"| paper (ImageNet-Sub, R50) | authors' code |", "|---|---|---|---|---|---|---|---|"]
    for method in aggregate.method_order(list(dict.fromkeys(table["method"]))):
        rows = table[table["method"] == method]
        cells = [method, gallery.seeds_text(sorted(rows["seed"]))]
        cells += [_mean_sd(rows[c].tolist()) for c in ("linear_top1_student", "linear_top1_teacher",
                                                        "final_knn", "avg_forgetting")]
        cells += [_num(report.PAPER_TOP1.get(method, math.nan)), _num(report.AUTHORS_CODE_TOP1.get(method, math.nan))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nMean ± sd over seeds; {entry.data}; {entry.network}; "
                               f"{entry.epochs[0]} epochs per task. [Report]({link}).")


def verdict_block(entry: gallery.StudyEntry, link: str) -> str:
    """The verdict on the paper's order and on its precondition, in one line, and the link."""
    return (f"**Verdict** ({len(entry.results.runs)} records, seeds {gallery.seeds_text(entry.seeds)}; "
            f"[report]({link})): the paper's order Joint > CCL > SimpleReplay > Finetuning: "
            f"**{entry.order}**; its precondition, a continual penalty (Joint > Finetuning): "
            f"**{entry.penalty}**.")


def gaps_block(entry: gallery.StudyEntry, link: str) -> str:
    """Each pair the verdict judges, then replay against forgetting: paired gap per seed and status."""
    table = entry.results.table
    pairs = [(aggregate.judged(table, a, b), a, b, aggregate.HEADLINE) for a, b in
             [aggregate.PENALTY, *zip(aggregate.PAPER_ORDER, aggregate.PAPER_ORDER[1:])]
             if {a, b} <= set(table["method"])]
    pairs += [(p, p.worse, p.better, aggregate.FORGETTING) for p in aggregate.forgetting_verdicts(table)]
    lines = ["| comparison | mean gap (sd) | per seed | verdict |", "|---|---|---|---|"]
    for judged, first, second, metric in pairs:
        diff = aggregate.paired_differences(table, first, second, metric)
        what = (f"{judged.better} > {judged.worse}" if metric == aggregate.HEADLINE
                else f"forgetting, {judged.better} < {judged.worse}")
        sd = f" ({judged.std:.2f})" if math.isfinite(judged.std) else ""
        lines.append(f"| {what} | {_num(judged.mean, sign=True)}{sd} | "
                     f"{', '.join(f'{seed}: {v:+.2f}' for seed, v in diff.items())} | {judged.status} |")
    return "\n".join(lines) + ("\n\nGaps on the final top-1 of the student (forgetting: Finetuning's minus "
                               f"the replay method's), per seed as seed: gap; [report]({link}).")


def _budget_gaps(entries: Sequence[gallery.StudyEntry]) -> tuple[list[gallery.StudyEntry], pd.DataFrame]:
    """`entries` from the smallest budget up, and their gaps (`aggregate.budget_gaps`)."""
    ordered = sorted(entries, key=lambda e: e.images_seen)
    return ordered, aggregate.budget_gaps([(e.images_seen, e.results.table) for e in ordered])


def comparisons_block(entry: gallery.StudyEntry, link: str) -> str:
    """Each pair beyond the paper's order (`aggregate.comparison_table`): gap, sd, per seed, status."""
    found = aggregate.comparison_table(entry.results.table)
    lines = ["| comparison | mean gap (sd) | per seed | verdict |", "|---|---|---|---|"]
    for row in found.itertuples(index=False):
        sd = f" ({row.std:.2f})" if math.isfinite(row.std) else ""
        lines.append(f"| {row.method} > {row.vs} | {_num(row.mean, sign=True)}{sd} | "
                     f"{row.per_seed.replace('seed ', '')} | {row.status} |")
    return "\n".join(lines) + (f"\n\nGaps on the final top-1 of the student, per seed as seed: gap; "
                               f"[report]({link}).")


def _gap_cell(mean: float, std: float, n: int, status: str) -> str:
    """A gap as a table cell: mean (sd), n seeds; bold with its status where the verdict's rule
    resolves it."""
    if status == "not run":
        return "not run"
    sd = f" ({std:.2f})" if math.isfinite(std) else ""
    cell = f"{_num(mean, sign=True)}{sd}, n {n}"
    return f"**{cell}, {status}**" if status in aggregate.RESOLVED else cell


def budget_block(entries: Sequence[gallery.StudyEntry]) -> str:
    """The budget axis over `entries`: each gap's mean (sd) per study, and its trend per doubling."""
    ordered, gaps = _budget_gaps(entries)
    trend = aggregate.budget_trend(gaps).set_index("gap")
    head = [f"{e.epochs[0]} epochs/task, {e.images_seen:,.0f} images" for e in ordered]
    lines = ["| gap | " + " | ".join(head) + " | per doubling |", "|---|" + "---|" * (len(ordered) + 1)]
    for gap, frame in gaps.groupby("gap", sort=False):
        cells = [_gap_cell(row.mean, row.std, row.n, row.status) for row in frame.itertuples(index=False)]
        slope = trend["per_doubling"].get(gap, math.nan)
        lines.append(f"| {gap} | " + " | ".join(cells) + f" | {_num(slope, sign=True)} |")
    return "\n".join(lines) + ("\n\nPaired gaps on the final top-1 of the student, mean (sd) over n seeds; "
                               "bold: passes the verdict's rule. Per doubling: the slope of a straight line "
                               "through the means against log2(images seen), a rough extrapolation.")


# what may differ between the studies of a replication: their classes, and where the records came from
CLASS_SET_FIELDS = ("data", "dataset", "classes")


def replication_block(entries: Sequence[gallery.StudyEntry]) -> str:
    """The verdict's gaps in studies that differ only in their classes, side by side, and whether
    each gap's verdict carries over (`aggregate.replication`); refused for studies that differ in
    anything else, where a difference would not be the classes' doing."""
    first = _settings_beyond_classes(entries[0])
    for entry in entries[1:]:
        differs = aggregate.config_differences(first, _settings_beyond_classes(entry))
        if differs:
            raise ConfigError(f"<!-- cclnb:replication --> compares studies that differ only in their classes; "
                              f"{entries[0].study} and {entry.study} also differ in {'; '.join(differs)}")
    per_study = [aggregate.pair_gaps(entry.results.table) for entry in entries]
    head = [f"{entry.study} ({entry.data}, seeds {gallery.seeds_text(entry.seeds)})" for entry in entries]
    lines = ["| gap | " + " | ".join(head) + " | across class sets |", "|---|" + "---|" * (len(entries) + 1)]
    for rows in zip(*per_study):
        cells = [_gap_cell(row["mean"], row["std"], row["n"], row["status"]) for row in rows]
        lines.append(f"| {rows[0]['gap']} | " + " | ".join(cells)
                     + f" | {aggregate.replication([row['status'] for row in rows])} |")
    return "\n".join(lines) + ("\n\nPaired gaps on the final top-1 of the student, mean (sd) over n seeds; "
                               "bold: passes the verdict's rule. Across class sets: replicates (resolved the "
                               "same way in every set), one set only, contradicts, or not resolved.")


def _settings_beyond_classes(entry: gallery.StudyEntry) -> dict:
    """The config of the study's Finetuning run (else its first trained run) without its class set
    and provenance: what must agree between the studies of a replication."""
    trained = [r for r in entry.results.runs if r.method not in report.BASELINES]
    config = next((r for r in trained if r.method == "Finetuning"), trained[0]).config
    return {k: v for k, v in config.items() if k not in (*CLASS_SET_FIELDS, *records.PROVENANCE_FIELDS)}


def axis_block(entries: Sequence[gallery.StudyEntry]) -> str:
    """The budget axis over `entries` in words: per budget, every gap's mean, seeds and status,
    then what the verdict's rule resolves there (`aggregate.budget_sentences`)."""
    ordered, gaps = _budget_gaps(entries)
    return (aggregate.budget_sentences(gaps, {e.images_seen: e.epochs[0] for e in ordered})
            + "\n\nPaired gaps on the final top-1 of the student (A - B > 0: A is better), from the records.")


def render_block(kind: str, args: Sequence[str], studies: Studies, here: Path) -> str:
    """The generated text of one block; `here` is the page's folder (links are relative to it)."""
    def link(study: str) -> str:
        return Path(os.path.relpath(studies.root / study / "index.html", here)).as_posix()

    single: dict[str, Callable[[gallery.StudyEntry, str], str]] = {
        "summary": summary_block, "verdict": verdict_block, "gaps": gaps_block, "comparisons": comparisons_block}
    if kind in single:
        if len(args) != 1:
            raise ConfigError(f"<!-- cclnb:{kind} ... --> names one study, got {list(args)}")
        return single[kind](studies[args[0]], link(args[0]))
    several = {"budget": budget_block, "axis": axis_block, "replication": replication_block}
    if kind in several:
        if len(args) < 2:
            raise ConfigError(f"<!-- cclnb:{kind} ... --> names two or more studies, got {list(args)}")
        return several[kind]([studies[a] for a in args])
    raise ConfigError(f"unknown table kind {kind!r} in <!-- cclnb:{kind} -->; use one of "
                      f"{', '.join([*single, *several])}")


def update_text(text: str, studies: Studies, here: Path) -> str:
    """`text` with every block's body regenerated from the records."""
    def fill(match: re.Match[str]) -> str:
        body = render_block(match["kind"], match["args"].split(), studies, here)
        return f"{match['open']}{body}\n{match['close']}"

    return BLOCK.sub(fill, text)


def pages(root: str | Path, names: Sequence[str] = DEFAULT_PAGES) -> list[Path]:
    """The Markdown pages `names` (globs) under `root` that hold at least one block."""
    found = sorted({p for name in names for p in Path(root).glob(name)})
    return [p for p in found if BLOCK.search(p.read_text(encoding="utf-8"))]


def stale(paths: Sequence[Path], reports_root: str | Path) -> list[Path]:
    """The pages whose blocks differ from what the records give now."""
    studies = Studies(reports_root)
    return [p for p in paths
            if update_text(text := p.read_text(encoding="utf-8"), studies, p.resolve().parent) != text]


def write(paths: Sequence[Path], reports_root: str | Path) -> list[Path]:
    """Regenerate every block of `paths` in place; returns the pages that changed."""
    studies = Studies(reports_root)
    changed = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        new = update_text(text, studies, path.resolve().parent)
        if new != text:
            _atomic_write_text(path, new)
            changed.append(path)
    return changed
