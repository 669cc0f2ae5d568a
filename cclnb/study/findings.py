"""What a study's records show and what they cannot show, as sentences computed from them.

A report page says what its numbers mean right under its verdict. Everything that is arithmetic
(how many runs beat their untrained encoder, which gaps pass the verdict's rule, at how many seeds
a method ends above another, how far the setting is from the paper's) is computed here from the
per-seed table and the records' configs, so it cannot drift from the numbers. What is judgement
(why a gap may mean something other than the paper's mechanism) is written once per study, in
`reports/<study>/notes.md`, and shown after the computed lines (`read_notes`).

Pure functions of plain data, like `cclnb.study.aggregate`; the labels (`data_label`,
`network_label`) are shared with the gallery (`cclnb.study.gallery`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from cclnb.study import aggregate
from cclnb.study.report import (BASELINES, PAPER_SETTING, UNTRAINED, UNTRAINED_BN, dataset_label,
                                matches_paper_setting)

NOTES = "notes.md"          # reports/<study>/notes.md: the study's title and its judgement, written once
BASELINE_NAMES = {UNTRAINED: "untrained encoder as built", UNTRAINED_BN: "untrained-bn encoder"}


# ----------------------------------------------------------------------------- labels
def network_label(config: Mapping[str, Any]) -> str:
    """`ResNet-18 w16, cifar stem, 32 px`: the architecture, its width when not torchvision's, the
    stem and the image size a run trained at."""
    arch = str(config.get("arch", "?")).replace("resnet", "ResNet-")
    width = config.get("width")
    size = config.get("image_size")
    return (f"{arch}{f' w{width}' if width not in (None, 64) else ''}, {config.get('stem', 'auto')} stem, "
            f"{f'{size} px' if size else 'native size'}")


def data_label(config: Mapping[str, Any]) -> str:
    """`tiny-imagenet-32-sub100, 10 tasks, 250 img/class`: the dataset, its task split, the images
    per class when subsampled and the tasks trained when fewer than the split."""
    parts = [dataset_label(dict(config)), f"{config.get('n_tasks')} tasks"]
    if config.get("train_tasks"):
        parts.append(f"first {config['train_tasks']} trained")
    if config.get("subset_per_class"):
        parts.append(f"{config['subset_per_class']} img/class")
    return ", ".join(parts)


def read_notes(folder: str | Path) -> str:
    """The study's written judgement (`notes.md` in its report folder), or "" when it has none."""
    path = Path(folder) / NOTES
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def notes_title(notes: str) -> str:
    """The first `# heading` of a study's notes, or "" without one."""
    first = notes.splitlines()[0] if notes else ""
    return first[2:].strip() if first.startswith("# ") else ""


def notes_body(notes: str) -> str:
    """The notes without their title line."""
    return "\n".join(notes.splitlines()[1:]).strip() if notes_title(notes) else notes


# ----------------------------------------------------------------------------- computed lines
def against_baselines(table: pd.DataFrame, metric: str = aggregate.HEADLINE) -> list[str]:
    """Per untrained baseline the study measured: how many trained runs end above the baseline of
    their own seed on `metric`, and by how much (the smallest and largest margin)."""
    if metric not in table.columns:
        return []
    trained = table[~table["method"].isin(BASELINES)].dropna(subset=[metric])
    lines = []
    for base in BASELINES:
        level = table[table["method"] == base].dropna(subset=[metric]).set_index("seed")[metric]
        margin = (trained[metric] - trained["seed"].map(level)).dropna()
        if margin.empty:
            continue
        above = int((margin > 0).sum())
        by = (f"{margin.min():+.2f} to {margin.max():+.2f}" if margin.min() != margin.max()
              else f"{margin.min():+.2f}")
        lines.append(f"{above} of {len(margin)} trained runs end above the {BASELINE_NAMES[base]} of their "
                     f"seed ({by} points).")
    return lines


def _pairs(table: pd.DataFrame) -> list[tuple[str, str]]:
    """The penalty, then the neighbouring pairs of the paper's order, whose methods both ran."""
    methods = set(table["method"]) if "method" in table.columns else set()
    pairs = [aggregate.PENALTY, *zip(aggregate.PAPER_ORDER, aggregate.PAPER_ORDER[1:])]
    return [(a, b) for a, b in pairs if {a, b} <= methods]


def pair_line(table: pd.DataFrame, better: str, worse: str, metric: str = aggregate.HEADLINE) -> str:
    """`SimpleReplay > Finetuning: not resolved (+0.52, sd 0.34; above at 5 of 5 seeds)`."""
    judged = aggregate.judged(table, better, worse, metric)
    diff = aggregate.paired_differences(table, better, worse, metric)
    name = " (the continual penalty)" if (better, worse) == aggregate.PENALTY else ""
    if judged.n == 0:
        return f"{better} > {worse}{name}: no seed run by both."
    spread = f"sd {judged.std:.2f}" if math.isfinite(judged.std) else "one seed"
    return (f"{better} > {worse}{name}: {judged.status} ({judged.mean:+.2f}, {spread}; {better} above at "
            f"{int((diff > 0).sum())} of {len(diff)} seeds).")


def shows_and_cannot(table: pd.DataFrame, configs: Sequence[Mapping[str, Any]],
                     metric: str = aggregate.HEADLINE) -> tuple[list[str], list[str]]:
    """(what the records show, what they cannot show), each a list of sentences. Pairs that pass
    the verdict's rule either way are shown; unresolved ones are what the study cannot tell."""
    shows = against_baselines(table, metric)
    cannot = []
    for better, worse in _pairs(table):
        line = pair_line(table, better, worse, metric)
        status = aggregate.judged(table, better, worse, metric).status
        (shows if status in ("holds", "reversed") else cannot).append(line)
    penalty = aggregate.judged(table, *aggregate.PENALTY, metric) if aggregate.PENALTY in _pairs(table) else None
    if penalty is None or penalty.status != "holds":
        cannot.append("Whether replay or CCL recover a cost of training on the sequence: without a resolved "
                      "continual penalty (Joint > Finetuning) there is no measured cost to recover, so their "
                      "gaps over Finetuning may be what replayed images add as training data.")
    trained = table[~table["method"].isin(BASELINES)]
    seeds = trained.groupby("method")["seed"].nunique() if not trained.empty else pd.Series(dtype=int)
    if len(seeds):
        low, high = int(seeds.min()), int(seeds.max())
        count = f"{low} to {high} seeds" if low != high else f"{low} seed{'s' * (low != 1)}"
        cannot.append(f"Beyond these seeds: {count} per method, so each call rests on a standard deviation "
                      f"of that many numbers." if low >= 2 else
                      f"Any gap between methods: {count} per method, and the rule needs at least 2 paired seeds.")
    if configs and not any(matches_paper_setting(dict(c)) for c in configs):
        first = configs[0]
        cannot.append(f"The paper's absolute numbers: this study is {data_label(first)}, "
                      f"{network_label(first)}, {first.get('epochs')} epochs per task; the paper's "
                      f"is {PAPER_SETTING}.")
    return shows, cannot


def findings_markdown(table: pd.DataFrame, configs: Sequence[Mapping[str, Any]], notes: str = "",
                      metric: str = aggregate.HEADLINE) -> str:
    """The page's "what this shows / cannot show": the computed lines, then the written judgement."""
    shows, cannot = shows_and_cannot(table, configs, metric)
    parts = ["**What this shows** (computed from the records; by the verdict's rule, on the final linear "
             "top-1 of the student):", *(f"- {line}" for line in shows or ["nothing passes the rule."]),
             "", "**What this cannot show:**", *(f"- {line}" for line in cannot)]
    body = notes_body(notes)
    if body:
        parts += ["", body]
    return "\n".join(parts)
