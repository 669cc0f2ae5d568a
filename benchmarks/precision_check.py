"""Does bf16 autocast train as well as fp32 on this machine? One short MoCo v2 run per precision,
same seed, same batches; the MoCo loss per epoch side by side and the final kNN accuracy.

    python benchmarks/precision_check.py --out benchmarks/precision-cpu.md

Writes the markdown table and a PNG of both loss curves next to it (`<out>.png`).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from cclnb import Trainer
from cclnb.config import TrainConfig
from cclnb.data import load_uint8, open_dataset
from cclnb.evaluate import evaluate_encoder
from cclnb.training.runs import git_commit


def run(precision: str, epochs: int, device: str) -> dict:
    """Finetuning (plain MoCo v2) on the embedded digits as one task: per-step losses, kNN after."""
    train, val = open_dataset("demo-digits", "train"), open_dataset("demo-digits", "val")
    config = TrainConfig(data="demo-digits", method="Finetuning", arch="resnet18", stem="imagenet", n_tasks=1,
                         epochs=epochs, batch_size=64, lr=0.01, moco_m=0.99, moco_k=256, mlp=True,
                         aug_plus=True, cos=True, moco_t=0.2, bn_groups=2, key_bn_groups=2, seed=0,
                         precision=precision, device=device, progress=False)
    trainer = Trainer.from_images(config, load_uint8(train), train.targets)
    started = time.perf_counter()
    trainer.start_task(0)
    losses = [[float(r.losses["moco"]) for r in trainer.run_epoch()] for _ in range(epochs)]
    seconds = time.perf_counter() - started
    knn = evaluate_encoder(trainer.model.encoder_q.backbone, load_uint8(train), train.targets, load_uint8(val),
                           val.targets, trainer.plan.task_classes, "knn", device, knn_k=20,
                           precision=precision, progress=False)["knn"]["all"]
    return {"losses": losses, "seconds": seconds, "knn": knn, "ln_k": float(np.log(config.moco_k + 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/precision-cpu.md"))
    args = parser.parse_args()
    results = {p: run(p, args.epochs, args.device) for p in ("fp32", "bf16")}
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for precision, r in results.items():
        steps = np.concatenate(r["losses"])
        ax.plot(np.arange(1, len(steps) + 1), steps, label=f"{precision} (kNN {r['knn']:.1f}%)")
    ax.axhline(results["fp32"]["ln_k"], color="grey", ls="--", lw=1, label="ln(K+1): chance")
    ax.set(xlabel="step", ylabel="MoCo loss", title="MoCo v2 on the demo digits, same seed and batches")
    ax.legend(fontsize=8)
    png = args.out.with_suffix(".png")
    fig.savefig(png, dpi=110)
    rows = ["| epoch | fp32 MoCo loss | bf16 MoCo loss |", "|---|---|---|"]
    for e, (a, b) in enumerate(zip(results["fp32"]["losses"], results["bf16"]["losses"])):
        rows.append(f"| {e} | {np.mean(a):.4f} | {np.mean(b):.4f} |")
    lines = [
        "# bf16 autocast vs fp32: the same short MoCo v2 run",
        "",
        f"- command: `python benchmarks/precision_check.py --epochs {args.epochs} --device {args.device} --out {args.out}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; commit {git_commit() or '?'}; "
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "- Finetuning (MoCo v2) on the embedded digits as one task, ResNet-18 ImageNet stem, batch 64, "
        "lr 0.01, key momentum 0.99, queue 256, seed 0: the same batches in both runs",
        "",
        *rows,
        "",
        f"- final kNN (k 20, all classes, val): fp32 {results['fp32']['knn']:.2f}%, bf16 {results['bf16']['knn']:.2f}%",
        f"- training time: fp32 {results['fp32']['seconds']:.0f} s, bf16 {results['bf16']['seconds']:.0f} s "
        f"(wall clock, whatever else the machine was doing)",
        f"- ln(K+1) = {results['fp32']['ln_k']:.3f} (a loss at chance level)",
        f"- curves: `{png.name}`",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
