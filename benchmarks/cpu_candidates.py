"""Issue 19's table: which CPU configuration learns the most per minute, from the candidate studies'
records (`benchmarks/cpu_candidates.sh` runs them).

One row per candidate: its settings, images seen per run, training time and speed, and for
Finetuning and Joint the final kNN and probe top-1 beside the candidate's own untrained (as built)
and untrained-bn baselines, as differences and ratios. A candidate's baselines are its own: a
narrower network also has weaker random features, so ratios alone flatter it and the absolute
numbers stand beside them. Writes `<out>.md` (the table with how it was made) and `<out>.png`
(accuracy against training time). Usage:

    python benchmarks/cpu_candidates.py [--reports reports] [--out benchmarks/cpu-candidates]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cclnb import records as study_records, report
from cclnb.runs import git_commit, short_commit

TRAINED = ("Finetuning", "Joint")
PREFIX = "cand-"


def candidate_rows(folder: Path) -> pd.DataFrame:
    """Per (method, seed) of one candidate study: settings, accuracy and throughput."""
    found = study_records.load_records([folder])
    runs = [study_records.as_run(r) for r in found]
    table = report.results_table(runs)
    extra = []
    for record in found:
        cfg, speed = record.config, record.data.get("throughput") or {}
        extra.append({
            "stem": cfg.get("stem"), "width": cfg.get("width", 64), "precision": cfg.get("precision"),
            "per_class": cfg.get("subset_per_class"), "compile": bool(cfg.get("compile")),
            "lr": cfg.get("lr"), "train_time_s": speed.get("train_time_s"),
            "img_per_s": speed.get("median_img_per_s"),
            "images_seen": _images_seen(cfg, record.data),
            "cpu": (record.data.get("provenance", {}).get("hardware") or {}).get("cpu_model"),
            "commit": short_commit(record.data.get("provenance", {}).get("git_commit")),
        })
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def _images_seen(cfg: dict, payload: dict) -> float:
    steps = (payload.get("throughput") or {}).get("steps")
    return float(steps * cfg["batch_size"]) if steps else float("nan")


def summarize(name: str, rows: pd.DataFrame) -> dict:
    """One table row: mean over seeds of each trained method against the candidate's baselines."""
    def mean(method: str, column: str) -> float:
        values = rows.loc[rows["method"] == method, column].astype(float)
        return float(values.mean()) if len(values) else float("nan")

    def seeds(method: str) -> str:
        return " ".join(str(int(s)) for s in sorted(rows.loc[rows["method"] == method, "seed"]))

    first = rows[rows["method"].isin(TRAINED)].iloc[0]
    out = {"candidate": name, "stem": first["stem"], "width": int(first["width"]),
           "precision": first["precision"], "per class": first["per_class"], "epochs": int(first["epochs"]),
           "lr": first["lr"], "compile": first["compile"], "images seen": first["images_seen"],
           "seeds": seeds("Finetuning"),
           "train s (FT)": mean("Finetuning", "train_time_s"), "img/s (FT)": mean("Finetuning", "img_per_s"),
           "kNN untrained": mean(report.UNTRAINED, "final_knn"),
           "kNN untrained-bn": mean(report.UNTRAINED_BN, "final_knn"),
           "probe untrained": mean(report.UNTRAINED, "linear_top1_student"),
           "probe untrained-bn": mean(report.UNTRAINED_BN, "linear_top1_student")}
    for method, short in (("Finetuning", "FT"), ("Joint", "Joint")):
        knn, probe = mean(method, "final_knn"), mean(method, "linear_top1_student")
        out.update({f"kNN {short}": knn, f"probe {short}": probe,
                    f"kNN {short} / untrained-bn": knn / out["kNN untrained-bn"],
                    f"probe {short} / untrained": probe / out["probe untrained"]})
    out["cpu"], out["commit"] = first["cpu"], first["commit"]
    return out


def build(reports: Path) -> pd.DataFrame:
    """One row per candidate study. A variant run with --no-baseline (name `<base>-<variant>`, the
    same network and seeds as `<base>`) is measured against `<base>`'s baselines."""
    per_study = {folder.parent.name[len(PREFIX):]: candidate_rows(folder)
                 for folder in sorted(reports.glob(f"{PREFIX}*/runs"))}
    rows = []
    for name, per_run in per_study.items():
        if not per_run["method"].isin(TRAINED).any():
            continue
        if not per_run["method"].isin(report.BASELINES).any():
            base = per_study.get(name.split("-", 1)[0], pd.DataFrame(columns=["method"]))
            per_run = pd.concat([per_run, base[base["method"].isin(report.BASELINES)
                                               & base["seed"].isin(per_run["seed"])]])
        rows.append(summarize(name, per_run))
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, out: Path) -> Path:
    """Final kNN and probe of Finetuning against its training time, one point per candidate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, base in ((axes[0], "kNN FT", "kNN untrained-bn"), (axes[1], "probe FT", "probe untrained")):
        for _, row in table.iterrows():
            ax.scatter(row["train s (FT)"] / 60, row[metric], s=40)
            ax.annotate(row["candidate"], (row["train s (FT)"] / 60, row[metric]), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
            ax.plot([row["train s (FT)"] / 60], [row[base]], marker="_", color="grey", markersize=14)
        ax.set_xlabel("Finetuning training time per run (min; 1 thread, 2 jobs on 2 cores)")
        ax.set_ylabel(f"{metric} (%); grey: the candidate's {base.split(' ', 1)[1]}")
        ax.grid(alpha=0.3)
    fig.suptitle("Short protocol: first 3 tasks of tin100-32-cpu (30 classes), mean over seeds")
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", default="reports", type=Path)
    parser.add_argument("--out", default="benchmarks/cpu-candidates", type=Path)
    args = parser.parse_args(argv)
    table = build(args.reports)
    if table.empty:
        print(f"no candidate records under {args.reports}/{PREFIX}*/runs; run benchmarks/cpu_candidates.sh")
        return 1
    numbers = table.select_dtypes(include=[np.number]).columns
    shown = table.copy()
    shown[numbers] = shown[numbers].round(2)
    lines = ["# CPU candidates: learning per CPU-minute (issue 19)", "",
             f"- made by: `python benchmarks/cpu_candidates.py` from the records of "
             f"`bash benchmarks/cpu_candidates.sh` (`{args.reports}/{PREFIX}*/runs`)",
             f"- table written {datetime.date.today().isoformat()}, commit {git_commit()}",
             "- protocol: `cclnb study --preset tin100-32-cpu -p train_tasks=3 --methods Finetuning Joint`: "
             "the first 3 tasks of the 10-task split (30 classes, 250 images per class unless said), "
             "batch 64, each study with its own untrained and untrained-bn baselines; kNN over the 30 "
             "classes trained on (bank 50 per class, k 20), probe = the fast L-BFGS probe over all 100 "
             "classes; 2 jobs on the 2 cores, 1 thread each (times are per run, with the other core busy)",
             "", shown.to_markdown(index=False), ""]
    md = args.out.with_suffix(".md")
    md.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(f"written: {md}, {plot(table, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
