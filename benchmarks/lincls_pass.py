"""What one epoch of the linear protocol costs for 1 encoder and for N sharing a pass (`cclnb lincls
--also`), the throughputs issue 42's cost model needs and has only assumed (docs/performance.md).

Each encoder is a randomly initialised backbone saved in the authors' checkpoint format (weights do
not change the cost). For each N, one `cclnb lincls --epochs 2` pass; its second epoch's wall time
(the result's `epoch_s`: the training loop alone, without val features or data opening) is the
epoch's cost. Output: a markdown table of training images per second of
one pass, and per encoder, with the command, date, device and commit.

    python benchmarks/lincls_pass.py --data ZIP --arch resnet50 --image-size 224 --encoders 1 4 \
        --subset-per-class 20 --device cuda --precision bf16 -j 16 --out OUT.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cclnb.commands.cli import main as cclnb
from cclnb.training.models import build_backbone


def random_checkpoints(folder: Path, n: int, arch: str, small: bool, width: int) -> list[str]:
    """`n` randomly initialised backbones, each in the authors' format (`state_dict`, `module.encoder_q.`)
    and a folder of its own (where its lincls results go)."""
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        backbone = build_backbone(arch, small, "auto", width)
        path = folder / f"encoder{i}" / "checkpoint.pth.tar"
        path.parent.mkdir()
        torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in backbone.state_dict().items()}}, path)
        paths.append(str(path))
    return paths


def epoch_seconds(paths: list[str], common: list[str]) -> float:
    """Wall seconds of the second lincls epoch of `paths` in one pass (the first may include
    warm-up: worker start-up, cuDNN's algorithm search), from the result's `epoch_s`."""
    for path in paths:                           # each encoder's output folder is its checkpoint's
        for stale in Path(path).parent.glob("lincls_*"):
            stale.unlink()
    also = ["--also", *paths[1:]] if len(paths) > 1 else []
    code = cclnb(["lincls", "--pretrained", paths[0], *also, "--epochs", "2", *common])
    if code != 0:
        raise SystemExit(f"cclnb lincls exited {code}")
    result = json.loads((Path(paths[0]).parent / "lincls_student.json").read_text(encoding="utf-8"))
    return float(result["epoch_s"][-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("-a", "--arch", default="resnet50")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--encoders", type=int, nargs="+", default=[1, 4], help="encoders per pass, one row each")
    parser.add_argument("--subset-per-class", type=int, default=20)
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("-j", "--workers", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    small = args.image_size <= 64
    common = ["--data", args.data, "-a", args.arch, "--width", str(args.width), "--image-size", str(args.image_size),
              "--subset-per-class", str(args.subset_per_class), "-b", str(args.batch_size), "-j", str(args.workers),
              "--device", args.device, "--precision", args.precision, "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = random_checkpoints(Path(tmp), max(args.encoders), args.arch, small, args.width)
        rows = []
        for n in args.encoders:
            seconds = epoch_seconds(paths[:n], common)
            rows.append((n, seconds))
    from cclnb.data import open_dataset

    images = args.subset_per_class * len(open_dataset(args.data, "train").classes)
    device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "CPU"
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"# cclnb lincls, one pass shared by N encoders: {args.arch} (width {args.width}), "
             f"{args.image_size} px, batch {args.batch_size}", "",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; device: {device}; commit: {commit}",
             f"- one epoch = {images} training images; the second epoch's training loop, timed by cclnb lincls (`epoch_s`)",
             "", "| encoders in the pass | epoch (s) | pass img/s | img/s per encoder (forward + fc step) |",
             "|---|---|---|---|"]
    for n, seconds in rows:
        lines.append(f"| {n} | {seconds:.2f} | {images / seconds:,.0f} | {n * images / seconds:,.0f} |")
    (one, alone), (most, shared) = min(rows), max(rows)
    lines += ["", "For the cost model (`cclnb study --launcher slurm --dry-run`): `--throughput lincls="
              f"{images / alone:.0f} --throughput forward={most * images / shared:.0f}` (the forward rate is a "
              f"lower bound: the {most}-encoder pass may still wait for its data)" if most > 1 else ""]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
