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

from cclnb.study import records as study_records, report
from cclnb.training.runs import git_commit, short_commit

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


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of `frame` (floats to 2 decimals, NaN as -)."""
    def cell(value) -> str:
        if isinstance(value, float):
            if np.isnan(value):
                return "-"
            return f"{value:,.0f}" if value.is_integer() else f"{value:.2f}" if abs(value) >= 0.1 else f"{value:g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


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


# The speed column: one MoCo v2 training step (cclnb's fast path: uint8 images, batched augmentation,
# train_step) per candidate network, timed in interleaved rounds within one process, so that whatever
# else the machine does falls on every candidate alike; each candidate's speed is also given as its
# median ratio to the reference within a round. 1 thread, batch 64: what one job of a study sees.
SPEED_CANDIDATES = {"ref": dict(stem="imagenet", width=64, precision="fp32"),
                    "w16": dict(stem="cifar", width=16, precision="bf16"),
                    "w16-fp32": dict(stem="cifar", width=16, precision="fp32"),
                    "w32": dict(stem="cifar", width=32, precision="bf16"),
                    "w64": dict(stem="cifar", width=64, precision="bf16")}


def measure_speed(data: str, rounds: int = 5, steps: int = 8, threads: int = 1) -> pd.DataFrame:
    """img/s of each SPEED_CANDIDATES network's training step (median over rounds) and its median
    ratio to `ref` within a round."""
    import itertools
    import tempfile

    import torch

    from cclnb.data import load_uint8, open_dataset
    from cclnb.data.batches import TensorFeeder, epoch_order
    from cclnb.training import dist
    from cclnb.training.bench import BenchOptions, StepFactory, time_steps

    torch.set_num_threads(threads)
    ctx = dist.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batch = 64
    n = batch * (steps + 1)
    images = load_uint8(open_dataset(data, "train"), ids=np.arange(n), progress=False)
    entries = (np.arange(n), np.zeros(n, dtype=bool))
    speeds: dict[str, list[float]] = {name: [] for name in SPEED_CANDIDATES}
    with tempfile.TemporaryDirectory(prefix="cclnb-speed-") as tmp:
        factories = {name: StepFactory(BenchOptions(device="cpu", batch_size=batch, steps=steps, warmup=1,
                                                    stem=spec["stem"], width=spec["width"]),
                                       images[:batch], ctx, Path(tmp) / name)
                     for name, spec in SPEED_CANDIDATES.items()}
        for _, name in itertools.product(range(rounds), SPEED_CANDIDATES):
            def batches():
                feeder = TensorFeeder(images, np.arange(n), 32, False, True, ctx.device)
                return feeder.batches(entries, epoch_order(n, 0, 0, 0), batch, 0, 1, 0,
                                      torch.Generator().manual_seed(1))
            step = factories[name].get("MoCo", SPEED_CANDIDATES[name]["precision"])
            speeds[name].append(time_steps(step, batches, 1, steps, batch, ctx.device)[1])
    ratios = {name: np.median(np.asarray(v) / np.asarray(speeds["ref"])) for name, v in speeds.items()}
    return pd.DataFrame([{"network": name, **SPEED_CANDIDATES[name], "img/s (median)": np.median(v),
                          "x ref (median within a round)": ratios[name], "rounds": rounds}
                         for name, v in speeds.items()])


def plot(table: pd.DataFrame, out: Path, speed: pd.DataFrame | None = None) -> Path:
    """Final kNN and probe of Finetuning against its training cost, one point per candidate. With
    the interleaved speed, the cost is images seen / relative speed (the reference at 8 epochs = 1);
    without it, the measured training time (distorted by whatever else shared the cores)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if speed is not None:
        ratio = dict(zip(speed["network"], speed["x ref (median within a round)"]))
        ref_images = float(table.loc[table["candidate"] == "ref", "images seen"].iloc[0])
        cost = [row["images seen"] / ref_images / ratio.get(row["candidate"], ratio.get(row["candidate"].split("-")[0], np.nan))
                for _, row in table.iterrows()]
        label = "training cost relative to ref (images seen / interleaved step speed)"
    else:
        cost = (table["train s (FT)"] / 60).tolist()
        label = "Finetuning training time per run (min; measured while the cores were shared)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, base in ((axes[0], "kNN FT", "kNN untrained-bn"), (axes[1], "probe FT", "probe untrained")):
        for x, (_, row) in zip(cost, table.iterrows()):
            ax.scatter(x, row[metric], s=40)
            ax.annotate(row["candidate"], (x, row[metric]), fontsize=8, xytext=(4, 3), textcoords="offset points")
            ax.plot([x], [row[base]], marker="_", color="grey", markersize=14)
        ax.set_xlabel(label, fontsize=8)
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
    parser.add_argument("--speed", action="store_true",
                        help="also time each network's training step in interleaved rounds (minutes)")
    parser.add_argument("--data", default="../shared/data/tiny-imagenet-32-sub100.zip")
    args = parser.parse_args(argv)
    table = build(args.reports)
    if table.empty:
        print(f"no candidate records under {args.reports}/{PREFIX}*/runs; run benchmarks/cpu_candidates.sh")
        return 1
    lines = ["# CPU candidates: learning per CPU-minute (issue 19)", "",
             f"- made by: `python benchmarks/cpu_candidates.py` from the records of "
             f"`bash benchmarks/cpu_candidates.sh` (`{args.reports}/{PREFIX}*/runs`)",
             f"- table written {datetime.date.today().isoformat()}, commit {git_commit()}",
             "- protocol: `cclnb study --preset tin100-32-cpu -p train_tasks=3 --methods Finetuning Joint`: "
             "the first 3 tasks of the 10-task split (30 classes, 250 images per class unless said), "
             "batch 64, each study with its own untrained and untrained-bn baselines; kNN over the 30 "
             "classes trained on (bank 50 per class, k 20), probe = the fast L-BFGS probe over all 100 "
             "classes; 2 jobs on the 2 cores, 1 thread each (times are per run, with the other core busy)",
             "", markdown_table(table), ""]
    speed_csv = args.out.with_name(args.out.name + "-speed.csv")
    speed = pd.read_csv(speed_csv) if speed_csv.is_file() and not args.speed else None
    if args.speed:
        speed = measure_speed(args.data)
        speed.to_csv(speed_csv, index=False)
    if speed is not None:
        lines += ["## Training speed, interleaved", "",
                  "One MoCo v2 step of cclnb's fast path per network (batch 64, 1 thread), timed in "
                  "rounds that alternate the networks within one process, so that other load on the "
                  "machine falls on all alike; `x ref` is the median within-round ratio to the "
                  "reference network. These ratios, not the per-run img/s above (taken while other "
                  "work shared the cores), are what the choice reads.", "",
                  markdown_table(speed), ""]
    md = args.out.with_suffix(".md")
    md.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(f"written: {md}, {plot(table, args.out, speed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
