"""`reports/index.html`: every committed study on one page, generated from its records.

Each folder `reports/<study>/runs/` that holds records is one row: its title (the first heading of
the study's `notes.md`, else its data, network and budget), data, network, budget (epochs per task
and images one run of a method saw), methods, seeds, the verdict on the paper's order and the
status of its precondition (the continual penalty), the device, and a link to its report. Above
the table, the budget axis: for every family of studies that differ only in their epochs per task,
the paired gaps against the images seen (`cclnb.study.figures.plot_budget_gaps`).

`cclnb report index` writes it; nothing here trains or evaluates, and the page names no
machine's folders, so it is committed beside the reports it links.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from cclnb.errors import DataError
from cclnb.study import aggregate, figures, findings, records, report
from cclnb.training.runs import _atomic_write_text

GALLERY = "index.html"
COLUMNS = ("study", "data", "network", "budget", "methods", "seeds", "verdict on the paper's order",
           "continual penalty (Joint > Finetuning)", "device")


@dataclass(frozen=True)
class StudyEntry:
    """One study as the gallery lists it (`title`: from its notes.md, "" without); `results` are its
    records, read once."""

    study: str
    title: str
    data: str
    network: str
    epochs: tuple[int, ...]
    images_seen: float
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    order: str
    penalty: str
    device: str
    results: records.StudyResults

    def cells(self) -> list[str]:
        """The row's cells as HTML (the study's cell links its report)."""
        budget = f"{', '.join(map(str, self.epochs))} epoch{'s' * (self.epochs != (1,))}/task"
        if math.isfinite(self.images_seen):
            budget += f"; {self.images_seen:,.0f} images"
        link = f'<a href="{html.escape(self.study)}/index.html"><b>{html.escape(self.study)}</b></a>'
        return [f"{link}<br>{html.escape(self.title)}" if self.title else link, *(html.escape(text) for text in (
            self.data, self.network, budget, ", ".join(self.methods), seeds_text(self.seeds),
            self.order, self.penalty, self.device))]


def seeds_text(seeds: Sequence[int]) -> str:
    """`0-4` for consecutive seeds, else the seeds listed (`0 1 3`); `-` for none."""
    ordered = sorted(seeds)
    if not ordered:
        return "-"
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return " ".join(map(str, ordered))


def study_folders(reports_root: str | Path) -> list[Path]:
    """Every `reports_root/<study>` whose `runs/` holds at least one record, by name."""
    root = Path(reports_root)
    if not root.is_dir():
        raise DataError(f"{root} does not exist; pass the folder that holds the study reports "
                        f"(--reports-root, default reports)")
    return sorted(d for d in root.iterdir() if records.record_files([d / records.RECORDS_FOLDER]))


def _penalty_text(table: pd.DataFrame) -> str:
    """`not resolved (+0.06, sd 0.46, 5 seeds)`, or `not run` without Joint and Finetuning."""
    if not {*aggregate.PENALTY} <= set(table["method"]):
        return "not run"
    penalty = aggregate.continual_penalty(table)
    spread = f", sd {penalty.std:.2f}" if math.isfinite(penalty.std) else ""
    return f"{penalty.status} ({penalty.mean:+.2f}{spread}, {penalty.n} seed{'s' * (penalty.n != 1)})"


def _order_text(table: pd.DataFrame) -> str:
    """The verdict's outcome, or which of the paper's four methods the study did not run."""
    missing = [m for m in aggregate.PAPER_ORDER if m not in set(table["method"])]
    return aggregate.verdict(table).outcome if not missing else f"- (not run: {', '.join(missing)})"


def study_entry(folder: str | Path) -> StudyEntry:
    """The gallery's row for the study in `folder` (its records in `folder/runs`)."""
    folder = Path(folder)
    results = records.study_results([folder / records.RECORDS_FOLDER])
    trained = [r for r in results.runs if r.method not in report.BASELINES]
    if not trained:
        raise DataError(f"{folder / records.RECORDS_FOLDER} holds no record of a trained method; "
                        f"a study needs at least one (method, seed) to be listed")
    config = trained[0].config
    methods = aggregate.method_order(list(dict.fromkeys(r.method for r in trained)))
    seen = report.images_seen(results.runs, "Finetuning" if "Finetuning" in methods else methods[0])
    title = findings.notes_title(findings.read_notes(folder))
    devices = dict.fromkeys(report.device_label(r.config.get("hardware") or {}) for r in results.runs)
    return StudyEntry(
        study=folder.name, title=title, data=findings.data_label(config), network=findings.network_label(config),
        epochs=tuple(sorted({int(r.config["epochs"]) for r in trained})), images_seen=seen,
        methods=tuple(methods), seeds=tuple(sorted({report.seed_of(r) for r in trained})),
        order=_order_text(results.table), penalty=_penalty_text(results.table), device="; ".join(devices),
        results=results)


def budget_families(entries: Sequence[StudyEntry]) -> list[list[StudyEntry]]:
    """Groups of studies whose Finetuning runs share every setting but the epochs per task, with at
    least two budgets: each is one budget axis, the one with most budgets first. Studies without
    Finetuning are on none."""
    families: dict[str, list[StudyEntry]] = {}
    for entry in entries:
        base = next((r for r in entry.results.runs if r.method == "Finetuning"), None)
        if base is None or len(entry.epochs) != 1:
            continue
        settings = {k: v for k, v in aggregate.comparable_settings(base.config).items()
                    if k not in ("epochs", *records.PROVENANCE_FIELDS)}
        families.setdefault(json.dumps(settings, sort_keys=True, default=str), []).append(entry)
    axes = [sorted(family, key=lambda e: e.images_seen) for family in families.values()
            if len({e.epochs for e in family}) >= 2]
    return sorted(axes, key=len, reverse=True)          # the longest axis on top


def budget_figure_png(family: Sequence[StudyEntry]) -> bytes:
    """The budget axis of one family as PNG bytes (no timestamp or version metadata)."""
    gaps = aggregate.budget_gaps([(e.images_seen, e.results.table) for e in family])
    fig = figures.plot_budget_gaps(gaps)
    base = min((e.study for e in family), key=len)
    fig.axes[0].set_title(f"Budget axis: {base} and its siblings at "
                          f"{' / '.join(str(e.epochs[0]) for e in family)} epochs per task", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def row_html(entry: StudyEntry) -> str:
    """One study's row of the table (what the staleness test looks for in the committed page)."""
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in entry.cells()) + "</tr>"


def table_html(entries: Sequence[StudyEntry]) -> str:
    """The gallery's table: one row per study (what the browser test reads)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    rows = "\n".join(row_html(e) for e in entries)
    return f'<table id="studies">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>'


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.9em}th,td{border-bottom:1px solid #ddd;padding:0.45em 0.6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}tr:hover td{background:#fafafa}
figure{margin:1em 0}img{max-width:100%}code{background:#f4f4f4;padding:0 0.2em}"""


def render(entries: Sequence[StudyEntry], budget_pngs: Sequence[bytes]) -> str:
    """The whole page: the budget axes on top, then the table of studies."""
    axes = "\n".join(f'<figure><img alt="budget axis" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode("ascii")}"></figure>' for png in budget_pngs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cclnb: every study</title><style>{_STYLE}</style></head>
<body>
<h1>cclnb: every committed study</h1>
<p>{len(entries)} studies, one row each, generated by <code>cclnb report index</code> from the records in
<code>reports/&lt;study&gt;/runs/</code> (do not edit by hand). Each links its report page. The verdict
judges the paper's order Joint &gt; CCL &gt; SimpleReplay &gt; Finetuning on the final linear top-1
of the student, pair by pair over paired seeds (a pair holds when its mean gap exceeds twice its
standard deviation); its precondition is a continual penalty, Joint above Finetuning.</p>
<h2>The budget axis</h2>
<p>Studies that differ only in their epochs per task: each paired gap (mean over seeds, bar: min-max)
against the images one run of a method saw. Above zero, the paper's side of the gap wins.</p>
{axes or "<p>No two studies differ only in their budget yet.</p>"}
<h2>Studies</h2>
{table_html(entries)}
</body></html>
"""


def write_index(reports_root: str | Path = "reports") -> Path:
    """Write `reports_root/index.html` from every study's records; returns its path."""
    entries = [study_entry(folder) for folder in study_folders(reports_root)]
    path = Path(reports_root) / GALLERY
    _atomic_write_text(path, render(entries, [budget_figure_png(f) for f in budget_families(entries)]))
    return path
