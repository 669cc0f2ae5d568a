#!/usr/bin/env bash
# Issue 19's candidate CPU configurations, one short protocol for all: Finetuning and Joint over the
# first 3 tasks of tin100-32-cpu's 10-task split (--train-tasks 3: 30 classes), 59,904 images seen
# per run, seeds 0 and 1, each study with its own untrained and untrained-bn baselines; the
# per-task kNN is over the 30 classes trained on, the final fast probe over all 100 classes.
# Each candidate is a `cclnb study` (records under reports/cand-<name>/runs); the table is built by
# `python benchmarks/cpu_candidates.py`. Run it from a worktree at a fixed commit, e.g.
#   nice -n 10 bash benchmarks/cpu_candidates.sh [name ...]     (default: every candidate, in order)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BASE=(--preset tin100-32-cpu -p train_tasks=3 --methods Finetuning Joint)
# w16's variants train the same initial weights (same stem, width and seeds): they reuse cand-w16's
# untrained and untrained-bn baselines (--no-baseline; cpu_candidates.py reads them from cand-w16).
# The levers that change speed, not what is learned (fp32, compile), and the single-knob variants
# run Finetuning at seed 0 only: the 2 cores were shared with other work (see the table's notes).
declare -A ARGS=(
  [ref]="--seeds 0 1"                                                       # today's preset: ImageNet stem, width 64 (auto: fp32 here)
  [w16]="--seeds 0 1 -p stem=cifar -p width=16"                            # 3x3 stem, every pixel, quarter width (auto: bf16)
  [w32]="--seeds 0 -p stem=cifar -p width=32"                              # half width (seed 0: its speed, 0.70x, already rules it out)
  [w16-e16]="--seeds 0 --no-baseline -p stem=cifar -p width=16 -p epochs=16"   # twice the images: what more time buys
  [w16-500]="--seeds 0 --methods Finetuning --no-baseline -p stem=cifar -p width=16 -p subset_per_class=500 -p epochs=4"   # 500 images per class, same images seen
  [w16-fp32]="--seeds 0 --methods Finetuning --no-baseline -p stem=cifar -p width=16 -p precision=fp32"   # bf16 against fp32
  [w16-compile]='--seeds 0 --methods Finetuning --no-baseline -p stem=cifar -p width=16 -p extra={"compile":true}'   # torch.compile, compile time counted
  [w16-lr03]="--seeds 0 --methods Finetuning --no-baseline -p stem=cifar -p width=16 -p lr=0.03"   # the authors' lr (the preset: 0.015)
)
ORDER=(ref w16 w32 w16-e16 w16-500 w16-fp32 w16-compile w16-lr03)
for name in "${@:-${ORDER[@]}}"; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  $PY -m cclnb study "${BASE[@]}" --study "cand-$name" ${ARGS[$name]}   # a later --methods wins
  echo "candidate $name: study wall time $(( $(date +%s) - start )) s ($(date -Is))" | tee -a reports/cand-walltimes.log
done
