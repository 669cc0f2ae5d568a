"""Seeds, spread and a verdict: pure functions from per-seed results to one honest comparison.

The paper's claim is a ranking with gaps of 1-3 points. One run per method cannot show that: two
CPUs give different floats for the same seed, and a short run amplifies the difference. So a study
runs every method with several seeds, and this module turns the per-(method, seed) rows into

- a summary per method: mean, sample standard deviation, min, max and n over seeds;
- paired differences against Finetuning *with the same seed* (the seed fixes the initialisation
  and the data order, so pairing removes what the two runs share);
- a verdict on the paper's order Joint > CCL > SimpleReplay > Finetuning, by the rule in
  `VERDICT_RULE`, stated on the report page, with its precondition: a *continual penalty*
  (Joint > Finetuning). Where training on a sequence costs nothing, there is nothing for replay
  or CCL to recover, and the order of the other methods says nothing about the paper;
- the same rule on forgetting (does replay cut Finetuning's forgetting?), on CCL taken apart
  (each ablation against CCL and against SimpleReplay) and on the methods beyond the paper
  (CaSSLe, LUMP, a researcher's own: each against Finetuning and against CCL).

It also decides which results may be averaged at all: results whose configurations differ in
anything but the seed (and runtime-only fields) are not the same experiment, so `comparable`
refuses them from the average and says which field differs.

Everything here is a pure function of plain data (dicts of configs, pandas frames of rows),
so it is tested on synthetic numbers; `cclnb.study.records` reads the files and `cclnb.study.report` draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd

from cclnb.study.report import BASELINES

PAPER_ORDER = ("Joint", "CCL", "SimpleReplay", "Finetuning")   # best first, as the paper ranks them
BASELINE = "Finetuning"                                         # paired differences are against it
HEADLINE = "linear_top1_student"                                # the metric the verdict reads
PENALTY = ("Joint", "Finetuning")            # the precondition: the i.i.d. bound above the sequence
FORGETTING = "avg_forgetting"
REPLAY_METHODS = ("SimpleReplay", "CCL")     # each should forget less than Finetuning
VARIANT_REFERENCES = ("SimpleReplay",)       # what a variant is paired against besides its method
NEW_METHOD_REFERENCES = ("Finetuning", "CCL")   # what a method beyond the paper is paired against
# Config fields that change where or how visibly a run executes, not what it computes.
RUNTIME_FIELDS = frozenset({"seed", "run_dir", "resume", "progress", "workers", "print_freq",
                            "dist_url", "dist_timeout", "gpu", "rank", "tensorboard"})
# TrainConfig fields added after records were first written, with the behaviour those records had.
_DEFAULTS_OF_LATER_FIELDS = {"width": 64, "train_tasks": None, "method_module": None, "classes": None,
                             "prefetch": False, "grouped_bn": "reshape", "compile_mode": "default"}

# The per-seed columns summarised per method (those present in the table are used).
SUMMARY_METRICS = ("linear_top1_student", "linear_top1_teacher", "final_knn", "avg_acc",
                   "avg_forgetting", "bwt", "final_loss_moco")
VERDICT_RULE = (
    "For each neighbouring pair (A, B) of the paper's order Joint > CCL > SimpleReplay > "
    "Finetuning, d = A - B is taken per seed (same seed on both sides) on the final linear top-1 "
    "of the student. The pair *holds* when mean(d) > 2 sd(d), is *reversed* when "
    "mean(d) < -2 sd(d), and is *not resolved* when |mean(d)| <= 2 sd(d) or fewer than 2 seeds "
    "are paired (sd = sample standard deviation over seeds). The order **holds** when every pair "
    "holds, **does not hold** when any pair is reversed, and is **not resolved** otherwise.")


# ----------------------------------------------------------------------------- comparability
def comparable_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a resolved config that define the experiment (runtime-only fields dropped).
    A field the record predates (added to TrainConfig later) counts as its default, which is what
    that record's code ran with: old records stay comparable with new ones of the same settings.
    A method's options count by their flat names, where records written before methods declared
    their options hold them, and where a record of today's holds them under `method_options`.
    Options of other methods are dropped too: those older records carry CCL's in every method's
    config, where they did nothing."""
    filled = {**_DEFAULTS_OF_LATER_FIELDS, **config}
    filled.update(filled.pop("method_options", None) or {})
    foreign = _foreign_options(str(config.get("method", "")))
    return {k: v for k, v in filled.items() if k not in RUNTIME_FIELDS and k not in foreign}


def _foreign_options(method: str) -> frozenset[str]:
    """The registered options that `method` does not have (all of them for a method this process
    has not loaded: its own options are then names no registered method declares)."""
    from cclnb.errors import ConfigError
    from cclnb.training.methods.registry import classes, method_class, option_fields, option_owners

    classes()
    try:
        own = {f.name for f in option_fields(method_class(method))}
    except ConfigError:
        own = set()
    return frozenset(set(option_owners()) - own)


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """`field: a_value vs b_value` for every defining field on which two configs disagree."""
    sa, sb = comparable_settings(a), comparable_settings(b)
    return [f"{key}: {sa.get(key)!r} vs {sb.get(key)!r}"
            for key in sorted(set(sa) | set(sb)) if sa.get(key) != sb.get(key)]


@dataclass(frozen=True)
class Refusal:
    """A result left out of the average, and why (shown on the report page)."""

    key: Hashable          # the caller's id of the result (e.g. the record's file)
    group: str             # the method it belongs to
    seed: Any
    reason: str


def comparable(items: Sequence[tuple[Hashable, str, Any, Mapping[str, Any]]]
               ) -> tuple[list[Hashable], list[Refusal]]:
    """Which results may be averaged: `items` are (key, method, seed, config) in reading order.

    Per method, the reference configuration is the one most results share (ties: the one read
    first); a result with another configuration is refused, naming the fields that differ. A
    second result for a (method, seed) already kept is refused as a duplicate: the same seed
    counted twice would shrink the spread without new evidence.
    """
    kept: list[Hashable] = []
    refused: list[Refusal] = []
    for method in dict.fromkeys(m for _, m, _, _ in items):
        group = [item for item in items if item[1] == method]
        settings = [comparable_settings(cfg) for *_, cfg in group]
        counts = [sum(s == other for other in settings) for s in settings]
        reference = settings[counts.index(max(counts))]
        seen: dict[Any, Hashable] = {}
        for (key, _, seed, cfg), setting in zip(group, settings):
            if setting != reference:
                diff = config_differences(reference, cfg)
                refused.append(Refusal(key, method, seed, "configuration differs from the other "
                                       f"{method} results in " + "; ".join(diff)))
            elif seed in seen:
                refused.append(Refusal(key, method, seed, f"a second result for {method} seed "
                                       f"{seed} (kept: {seen[seed]}); remove one of the two"))
            else:
                seen[seed] = key
                kept.append(key)
    return kept, refused


# ----------------------------------------------------------------------------- summaries
def spread(values: Sequence[float]) -> dict[str, float]:
    """n, mean, sample std (ddof 1; NaN below 2 values), min and max of the finite values."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {"n": int(arr.size), "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
            "min": float(arr.min()), "max": float(arr.max())}


def method_order(methods: Sequence[str]) -> list[str]:
    """The paper's methods first in its order (Finetuning first, as the baseline), then others."""
    known = [m for m in reversed(PAPER_ORDER) if m in methods]
    return known + sorted(set(methods) - set(known))


def summary_table(per_seed: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """One row per method: `<metric>_mean/_std/_min/_max` for every metric present, and `n` (seeds).

    `per_seed` has one row per (method, seed) with a `method` and a `seed` column.
    """
    rows = []
    present = [m for m in metrics if m in per_seed.columns]
    for method in method_order(list(per_seed["method"].unique())):
        group = per_seed[per_seed["method"] == method]
        row: dict[str, Any] = {"method": method, "n": int(group["seed"].nunique()),
                               "seeds": " ".join(str(s) for s in sorted(group["seed"]))}
        for metric in present:
            stats = spread(group[metric].tolist())
            row.update({f"{metric}_{k}": v for k, v in stats.items() if k != "n"})
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(per_seed: pd.DataFrame, a: str, b: str, metric: str = HEADLINE) -> pd.Series:
    """metric(a) - metric(b) per seed that both methods have (indexed by seed), NaNs dropped."""
    def by_seed(method: str) -> pd.Series:
        return per_seed[per_seed["method"] == method].set_index("seed")[metric]

    return (by_seed(a) - by_seed(b)).dropna().sort_index()


def paired_table(per_seed: pd.DataFrame, baseline: str = BASELINE, metric: str = HEADLINE) -> pd.DataFrame:
    """For every method other than `baseline`: its per-seed difference to `baseline` (same seed),
    listed, and their n, mean, std, min and max."""
    rows = []
    for method in method_order(list(per_seed["method"].unique())):
        if method == baseline:
            continue
        diff = paired_differences(per_seed, method, baseline, metric)
        rows.append({"method": method, "vs": baseline, **spread(diff.tolist()),
                     "per_seed": ", ".join(f"seed {s}: {v:+.2f}" for s, v in diff.items())})
    return pd.DataFrame(rows, columns=["method", "vs", "n", "mean", "std", "min", "max", "per_seed"])


# ----------------------------------------------------------------------------- the verdict
@dataclass(frozen=True)
class PairVerdict:
    """One neighbouring pair of the paper's order, judged on the paired differences."""

    better: str            # the method the paper ranks higher
    worse: str
    n: int
    mean: float            # mean of better - worse over paired seeds (worse - better where lower is better)
    std: float
    status: str            # holds | reversed | not resolved
    relation: str = ">"    # "<" for a metric where lower is better (forgetting)

    def sentence(self) -> str:
        claim = f"{self.better} {self.relation} {self.worse}"
        if self.n == 0:
            return f"{claim}: not resolved (no seed run by both)"
        gap = f"mean gap {self.mean:+.2f}, sd {self.std:.2f} over {self.n} seed{'s' * (self.n > 1)}"
        return f"{claim}: {self.status} ({gap})"


@dataclass(frozen=True)
class Verdict:
    """The paper's order judged as a whole, with each pair's evidence."""

    outcome: str           # holds | does not hold | not resolved
    pairs: tuple[PairVerdict, ...]
    metric: str

    def line(self) -> str:
        """The verdict line of the report."""
        return (f"Paper's order {' > '.join(PAPER_ORDER)} on {self.metric}: **{self.outcome}**. "
                + "; ".join(p.sentence() for p in self.pairs) + ".")


def judge_pair(diff: Sequence[float]) -> tuple[str, float, float]:
    """(status, mean, std) of paired differences d = better - worse, by `VERDICT_RULE`."""
    stats = spread(diff)
    n, mean, std = stats["n"], stats["mean"], stats["std"]
    if n < 2:
        return "not resolved", mean, std
    if mean > 2 * std:
        return "holds", mean, std
    if mean < -2 * std:
        return "reversed", mean, std
    return "not resolved", mean, std


def judged(per_seed: pd.DataFrame, better: str, worse: str, metric: str = HEADLINE,
           lower_is_better: bool = False) -> PairVerdict:
    """The claim "`better` beats `worse` on `metric`" judged by `VERDICT_RULE` on paired seeds
    (d = better - worse, or worse - better where lower is better, so d > 0 always favours `better`)."""
    first, second = (worse, better) if lower_is_better else (better, worse)
    diff = paired_differences(per_seed, first, second, metric).tolist() if _has(per_seed, metric) else []
    status, mean, std = judge_pair(diff)
    return PairVerdict(better, worse, len(diff), mean, std, status, "<" if lower_is_better else ">")


def _has(per_seed: pd.DataFrame, metric: str) -> bool:
    return metric in per_seed.columns and "method" in per_seed.columns


def verdict(per_seed: pd.DataFrame, order: Sequence[str] = PAPER_ORDER, metric: str = HEADLINE) -> Verdict:
    """Judge every neighbouring pair of `order` on `metric`, then the order, by `VERDICT_RULE`."""
    pairs = [judged(per_seed, better, worse, metric) for better, worse in zip(order, order[1:])]
    statuses = {p.status for p in pairs}
    outcome = ("does not hold" if "reversed" in statuses
               else "holds" if statuses == {"holds"} else "not resolved")
    return Verdict(outcome, tuple(pairs), metric)


def continual_penalty(per_seed: pd.DataFrame, metric: str = HEADLINE) -> PairVerdict:
    """The verdict's precondition, Joint > Finetuning: does training on a sequence cost anything?"""
    return judged(per_seed, *PENALTY, metric)


def penalty_line(penalty: PairVerdict) -> str:
    """The precondition's line on the page, and what follows from it for the paper's order."""
    head = f"Precondition, a continual penalty: {penalty.sentence()}."
    if penalty.status == "holds":
        return (f"{head} Training on the sequence costs something here, so the order of Finetuning, "
                f"SimpleReplay and CCL below is evidence about the paper's claim.")
    return (f"{head} **Without a resolved penalty the order of Finetuning, SimpleReplay and CCL cannot be "
            f"read as evidence about the paper**: there is no cost of the sequence for replay or CCL to "
            f"recover, and their gaps measure something else (e.g. what replayed images add as data).")


def forgetting_verdicts(per_seed: pd.DataFrame, variants: Mapping[str, str] | None = None
                        ) -> list[PairVerdict]:
    """Against forgetting, by the verdict's rule: each replay method, and each method beyond the
    paper's, < Finetuning on average forgetting (only the pairs whose methods the study ran)."""
    methods, variants = _methods(per_seed), _variants(variants)
    beyond = [m for m in methods if m not in PAPER_ORDER and m not in variants]
    return [judged(per_seed, m, BASELINE, FORGETTING, lower_is_better=True)
            for m in (*REPLAY_METHODS, *beyond) if m in methods and BASELINE in methods]


def _methods(per_seed: pd.DataFrame) -> list[str]:
    """The trained methods of the table: the untrained baselines are rows, not methods to compare."""
    found = per_seed["method"] if "method" in per_seed.columns else []
    return [m for m in dict.fromkeys(found) if m not in BASELINES]


def _variants(variants: Mapping[str, str] | None) -> Mapping[str, str]:
    """The given variant -> method map, or the registered methods' (CCL's ablations)."""
    if variants is not None:
        return variants
    from cclnb.training.methods.registry import variant_bases

    return variant_bases()


def comparison_pairs(methods: Sequence[str], variants: Mapping[str, str]) -> list[tuple[str, str]]:
    """The paired comparisons beyond the paper's order, for the methods a study ran: a variant
    (an ablation: `variants` maps it to its method) against its method and SimpleReplay; any other
    method outside the paper's order (CaSSLe, LUMP, ...) against Finetuning and CCL."""
    pairs = []
    for method in methods:
        if method in variants:
            references = (variants[method], *VARIANT_REFERENCES)
        elif method not in PAPER_ORDER:
            references = NEW_METHOD_REFERENCES
        else:
            continue
        pairs += [(method, r) for r in dict.fromkeys(references) if r in methods and r != method]
    return pairs


def comparison_table(per_seed: pd.DataFrame, variants: Mapping[str, str] | None = None,
                     metric: str = HEADLINE) -> pd.DataFrame:
    """Every pair of `comparison_pairs`: method minus reference with the same seed, with the
    verdict's status of "method > reference". Empty when the study ran only the paper's methods."""
    rows = []
    for method, reference in comparison_pairs(_methods(per_seed), _variants(variants)):
        diff = paired_differences(per_seed, method, reference, metric)
        rows.append({"method": method, "vs": reference, **spread(diff.tolist()),
                     "status": judge_pair(diff.tolist())[0],
                     "per_seed": ", ".join(f"seed {s}: {v:+.2f}" for s, v in diff.items())})
    return pd.DataFrame(rows, columns=["method", "vs", "n", "mean", "std", "min", "max", "status", "per_seed"])


def verdict_markdown(per_seed: pd.DataFrame, variants: Mapping[str, str] | None = None) -> str:
    """The report's verdict section: the precondition, the paper's order, replay against
    forgetting, then the rule they all follow."""
    lines = [penalty_line(continual_penalty(per_seed)), verdict(per_seed).line()]
    forgetting = forgetting_verdicts(per_seed, variants)
    if forgetting:
        lines.append("Against forgetting (average forgetting, lower is better): "
                     + "; ".join(p.sentence() for p in forgetting) + ".")
    return "\n\n".join(lines) + f"\n\n*Rule:* {VERDICT_RULE} Forgetting pairs read d = forgetting of " \
        "Finetuning - forgetting of the other method."


# The budget axis: the gaps that say whether the sequence costs something, whether replay recovers
# it, and whether CCL adds to replay, followed across training budgets.
BUDGET_GAPS = (("Joint", "Finetuning"), ("SimpleReplay", "Finetuning"), ("CCL", "SimpleReplay"))


def pair_gaps(table: pd.DataFrame, metric: str = HEADLINE) -> list[dict[str, Any]]:
    """Each of `BUDGET_GAPS` in one study's per-seed table: its paired differences over seeds (n,
    mean, std, min, max) and its status by `VERDICT_RULE` ("not run" where the study lacks one of
    the pair's methods, so an empty gap does not read as a measured one)."""
    rows = []
    for a, b in BUDGET_GAPS:
        diff = (paired_differences(table, a, b, metric).tolist()
                if _has(table, metric) and {a, b} <= set(table["method"]) else [])
        rows.append({"gap": f"{a} - {b}", **spread(diff), "status": judge_pair(diff)[0] if diff else "not run"})
    return rows


def budget_gaps(points: Sequence[tuple[float, pd.DataFrame]], metric: str = HEADLINE) -> pd.DataFrame:
    """One row per (budget, gap): `points` are (images seen per method, per-seed table) of the same
    study at several budgets; each budget's `pair_gaps`, ordered by budget."""
    rows = [{"images_seen": images, **row}
            for images, table in sorted(points, key=lambda point: point[0]) for row in pair_gaps(table, metric)]
    return pd.DataFrame(rows, columns=["images_seen", "gap", "n", "mean", "std", "min", "max", "status"])


RESOLVED = ("holds", "reversed")


def replication(statuses: Sequence[str]) -> str:
    """Whether one gap's verdict carries over between studies that differ only in their classes.

    "replicates": every study resolves it the same way; "contradicts": one holds where another is
    reversed; "one set only": some resolve it and some do not (a finding on one class set is
    reported as such); "not resolved" in none; "not run" where a study lacks the pair."""
    if "not run" in statuses:
        return "not run"
    resolved = {status for status in statuses if status in RESOLVED}
    if len(resolved) == 2:
        return "contradicts"
    if not resolved:
        return "not resolved"
    return "replicates" if all(status in resolved for status in statuses) else "one set only"


def budget_trend(gaps: pd.DataFrame) -> pd.DataFrame:
    """Where each gap of the budget axis is heading: a least-squares line of its mean against
    log2(images seen), i.e. the change per doubling of compute, and the images seen at which that
    line crosses zero. A straight line through a few budgets is a rough extrapolation; it is what
    "where would the order turn" can honestly get from this machine, so the page says so.

    `heading`: "toward the paper" (the gap is below zero at the largest budget and grows), "away
    from the paper" (above zero and shrinking), "stays on the paper's side", "stays against the
    paper", or "flat" (slope exactly zero); fewer than two budgets give "one budget".
    `crosses_at` is NaN unless the line reaches zero beyond the largest budget."""
    rows = []
    for gap, frame in gaps.dropna(subset=["mean"]).groupby("gap", sort=False):
        largest = frame.loc[frame["images_seen"].idxmax()]
        row = {"gap": gap, "budgets": len(frame), "largest": float(largest["images_seen"]),
               "gap_at_largest": float(largest["mean"]), "seeds_at_largest": int(largest["n"]),
               "per_doubling": math.nan, "crosses_at": math.nan, "heading": "one budget"}
        x = np.log2(frame["images_seen"].to_numpy(dtype=np.float64))
        if np.unique(x).size >= 2:
            slope, intercept = np.polyfit(x, frame["mean"].to_numpy(dtype=np.float64), 1)
            below = row["gap_at_largest"] < 0
            row["per_doubling"] = float(slope)
            if slope == 0:
                row["heading"] = "flat"
            elif below == (slope > 0):   # heading for zero: toward the paper from below, away from above
                row["heading"] = "toward the paper" if below else "away from the paper"
                if -intercept / slope > x.max():
                    row["crosses_at"] = float(2.0 ** (-intercept / slope))
            else:
                row["heading"] = "stays against the paper" if below else "stays on the paper's side"
        rows.append(row)
    return pd.DataFrame(rows, columns=["gap", "budgets", "largest", "gap_at_largest", "seeds_at_largest",
                                       "per_doubling", "crosses_at", "heading"])


def budget_trend_markdown(trend: pd.DataFrame) -> str:
    """One line per gap of `budget_trend` for the page: where it stands, where it is heading, and
    where its line would cross zero (as a multiple of the largest budget run)."""
    lines = []
    for row in trend.itertuples(index=False):
        seeds = f"{row.seeds_at_largest} seed{'s' * (row.seeds_at_largest != 1)}"
        text = f"- **{row.gap}**: {row.gap_at_largest:+.2f} at the largest budget ({seeds})"
        if row.budgets >= 2:
            text += f", {row.per_doubling:+.2f} per doubling of images seen: {row.heading}"
        if math.isfinite(row.crosses_at):
            text += (f"; the line reaches zero near {row.crosses_at:,.0f} images per method "
                     f"({row.crosses_at / row.largest:.1f}x the largest budget run)")
        lines.append(text + ".")
    return "\n".join(lines) + ("\n\n*A straight line in log(images) through the budgets run: a rough "
                              "extrapolation, not a measurement.*")


def budget_sentences(gaps: pd.DataFrame, epochs: Mapping[float, float] | None = None) -> str:
    """One sentence per budget of `budget_gaps`, in its order, each checkable against the table:
    every gap's mean, seeds and status, then what holds (or is reversed) at that budget, in the
    paper's terms (A > B where the gap A - B holds). `epochs` names a budget by its epochs per task
    (images seen -> epochs) where the page knows them."""
    lines = []
    for images, frame in gaps.groupby("images_seen", sort=True):
        name = f"{images:,.0f} images per method"
        if epochs and images in epochs:
            name = f"{epochs[images]:g} epochs per task ({name})"
        parts, held = [], []
        for row in frame.itertuples(index=False):
            if row.status == "not run":
                parts.append(f"{row.gap} not run")
                continue
            seeds = f"{row.n} seed{'s' * (row.n != 1)}"
            parts.append(f"{row.gap} {row.mean:+.2f} ({seeds}, {row.status})")
            a, b = row.gap.split(" - ")
            if row.status in ("holds", "reversed"):
                held.append(f"{a} > {b}" if row.status == "holds" else f"{b} > {a} (reversed)")
        outcome = ("Resolved: " + ", ".join(held) + "." if held else "Nothing is resolved at this budget.")
        lines.append(f"- **{name}**: " + "; ".join(parts) + ". " + outcome)
    return "\n".join(lines)


def mean_spread_text(mean: float, std: float, low: float, high: float, n: int) -> str:
    """`mean ± std [min, max]` for the page (`-` when nothing was measured, no ± for one seed)."""
    if n == 0 or not math.isfinite(mean):
        return "-"
    if n == 1 or not math.isfinite(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f} [{low:.2f}, {high:.2f}]"
