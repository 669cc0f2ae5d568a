"""`cclnb bench`: one throughput table, the authors' data path vs cclnb's fast path vs the ceiling.

Runs anywhere: `cclnb bench --device cpu --batch-size 16 --steps 3` takes seconds on a laptop (the
demo data needs no files); on a GPU the defaults (ResNet-18, 32 px, batch 512) give the numbers
of docs/performance.md. The table is printed and written to `--out`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from cclnb.config import ARCHS, COMPILE_MODES, STEMS
from cclnb.training.bench import (BENCH_PRECISIONS, ROW_KEYS, BenchOptions, BenchResult, default_out, run_bench,
                                  write_table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchOptions()
    parser.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"),
                        help="where to train (default: cuda if present)")
    parser.add_argument("--arch", default=defaults.arch, choices=ARCHS, help="backbone (default resnet18)")
    parser.add_argument("--stem", default=defaults.stem, choices=STEMS,
                        help="ResNet stem (default auto: the 3x3 stem for <= 64 px; imagenet: the CPU presets')")
    parser.add_argument("--width", type=int, default=defaults.width,
                        help="channels of the ResNet's first stage (default 64; 16: quarter width)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help="training resolution; <= 64 px uses the small-image protocol (default 32)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="batch (default 512)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps per cell (default 50)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup,
                        help="untimed steps before each cell (default 3)")
    parser.add_argument("--precision", default=defaults.precision, choices=BENCH_PRECISIONS,
                        help="autocast precision of rows 1-3: auto (bf16 on CUDA and on CPUs with native "
                             "bf16, else fp32; the default), fp32, bf16, or both (rows 1-3 at each)")
    parser.add_argument("--data", default=defaults.data,
                        help="dataset folder / zip / CIFAR folder, or 'demo' (embedded, default)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader workers of the authors' row (default: min(16, CPUs))")
    parser.add_argument("--compile", action="store_true",
                        help="add rows with the query encoder under torch.compile")
    parser.add_argument("--compile-mode", default=defaults.compile_mode, choices=COMPILE_MODES,
                        help="torch.compile's mode of the --compile rows (reduce-overhead: CUDA graphs)")
    parser.add_argument("--rows", default=defaults.rows,
                        help=f"rows to measure: 'all' or a comma-separated list of {', '.join(ROW_KEYS)} "
                             f"(default {defaults.rows}: the authors' path, the fast path, the ceiling)")
    parser.add_argument("--profile", action="store_true",
                        help="append where a step's time goes: device busy vs wall, top ops (torch.profiler)")
    parser.add_argument("--out", default=None,
                        help="markdown file for the table (default benchmarks/bench-<device>-<arch>-<size>px.md)")


def run(args: argparse.Namespace) -> int:
    options = BenchOptions(device=args.device, arch=args.arch, stem=args.stem, width=args.width,
                           image_size=args.image_size,
                           batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                           precision=args.precision, data=args.data, workers=args.workers,
                           compile=args.compile, compile_mode=args.compile_mode, rows=args.rows,
                           profile=args.profile, out=args.out)
    command = "cclnb " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "cclnb bench"

    def write(result: BenchResult) -> Path:
        return write_table(result, Path(args.out) if args.out else default_out(options, result.device_type))

    # written after every cell (a timeout keeps what was measured), before the profile, then with it
    result = run_bench(options, command, on_table=write if options.profile else None, on_progress=write)
    out = write(result)
    print(result.to_markdown())
    print(f"table written to {out}")
    return 0
