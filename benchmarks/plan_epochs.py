"""Choose the tin100-32 study's epochs per task from a measured `cclnb bench` table.

Prints the number of epochs (stdout, for the shell) and writes the arithmetic to `--out`, so the
study's provenance says why it ran that many. The model: per epoch of every task, Finetuning and
Joint see the 50,000 training images once, SimpleReplay and CCL also their replay buffers
(n_save * C/n = 200 ids per finished task: 0 + 200 + ... + 1,800 = 9,000 more). MoCo-step methods
run at the fast path's MoCo rate, CCL at its CCL rate; the bench measures batch 512 while the
study trains at 256, so the rates are derated by `--batch-derate` (launch-bound at 32 px). The
budget is shared by `--seeds` seeds; the model counts the four methods as if run one after another,
which the study's concurrent jobs on one GPU beat, so the plan errs short.
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGES = 50_000
REPLAYED = sum(t * 200 for t in range(10))


def fast_path_rates(table: str) -> tuple[float, float]:
    """(MoCo img/s, CCL img/s) of the row '2. cclnb fast path' of a bench table."""
    for line in table.splitlines():
        if line.startswith("| 2. cclnb fast path"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            return float(cells[3].replace(",", "")), float(cells[5].replace(",", ""))
    raise SystemExit("no '2. cclnb fast path' row in the bench table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_table", type=Path)
    parser.add_argument("--budget", type=float, required=True,
                        help="seconds of training in all, every seed together")
    parser.add_argument("--seeds", type=int, default=1, help="seeds the budget is shared by")
    parser.add_argument("--batch-derate", type=float, default=0.7)
    parser.add_argument("--overhead", type=float, default=0.25,
                        help="fraction of the budget kept for per-task evaluation and selection")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    moco, ccl = fast_path_rates(args.bench_table.read_text())
    moco_256, ccl_256 = moco * args.batch_derate, ccl * args.batch_derate
    per_epoch = {"Finetuning": IMAGES / moco_256, "Joint": IMAGES / moco_256,
                 "SimpleReplay": (IMAGES + REPLAYED) / moco_256,
                 "CCL": (IMAGES + REPLAYED) / ccl_256}
    seconds_per_epoch = sum(per_epoch.values())
    usable = args.budget * (1 - args.overhead)
    epochs = max(1, int(usable / args.seeds // seconds_per_epoch))
    lines = [
        "# Epochs per task for the tin100-32 study",
        f"- bench fast path (batch 512): MoCo {moco:,.0f} img/s, CCL {ccl:,.0f} img/s",
        f"- derated x{args.batch_derate} for batch 256: MoCo {moco_256:,.0f}, CCL {ccl_256:,.0f} img/s",
        "- seconds per epoch-of-every-task (sequential equivalent): "
        + ", ".join(f"{m} {s:.1f}" for m, s in per_epoch.items()) + f"; total {seconds_per_epoch:.1f}",
        f"- budget {args.budget:.0f} s, {args.overhead:.0%} kept for evaluation -> {usable:.0f} s "
        f"over {args.seeds} seed(s) -> {epochs} epochs per task",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(epochs)


if __name__ == "__main__":
    main()
