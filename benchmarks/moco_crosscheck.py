"""Cross-check: does cclnb's MoCo v2 learn as an independent MoCo v2 loop does, same settings?

Why: the demo's and the CPU preset's encoders end below the untrained encoder's kNN accuracy.
Either cclnb trains wrong, or MoCo v2 at this budget does not learn these images. This script
separates the two. It trains, on the same images with the same hyperparameters and seed:

1. `cclnb`        - cclnb's Trainer (method Joint: one task holding every class);
2. `independent`  - a MoCo v2 loop written here from torchvision parts only (torchvision's
                    ResNet-18, `torchvision.transforms.v2` augmentations applied per image, its own
                    queue, momentum update, shuffled key BatchNorm and InfoNCE): no cclnb model,
                    augmentation, loss or trainer code;
3. `cclnb, lr 0`  - the cclnb Trainer with learning rate 0: the weights stay at initialisation,
                    only the BatchNorm running statistics move (the control for them);

and evaluates every encoder, and the untrained one, with the same weighted kNN written here
(cosine similarity, k nearest train images, votes exp(s / 0.07)) on the backbone features in
eval mode. Output: a markdown table (stdout, and `--out`).

    python benchmarks/moco_crosscheck.py --epochs 6 --out benchmarks/moco-crosscheck-demo.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.transforms import v2

from cclnb import Trainer
from cclnb.config import TrainConfig
from cclnb.data import load_uint8, open_dataset
from cclnb.training.runs import git_commit, short_commit

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class Setting:
    """The hyperparameters both implementations share (the demo preset's by default)."""

    epochs: int
    batch_size: int
    lr: float
    moco_k: int
    moco_m: float
    moco_t: float
    key_groups: int
    seed: int
    knn_k: int


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> normalized float, as every ImageNet-style pipeline feeds a ResNet."""
    return images.float().div(255).sub(MEAN).div(STD)


@torch.no_grad()
def knn_accuracy(backbone: nn.Module, train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor,
                 val_y: torch.Tensor, k: int, n_classes: int) -> float:
    """Weighted kNN top-1 (%) on L2-normalized backbone features, the backbone in eval mode."""
    was_training = backbone.training
    backbone.eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.cat([backbone(to_input(x[i:i + 256])).float()
                                      for i in range(0, len(x), 256)]), dim=1)

    bank, queries = features(train), features(val)
    similarity, index = (queries @ bank.t()).topk(k, dim=1)
    votes = torch.zeros(len(queries), n_classes).scatter_add_(1, train_y[index], (similarity / 0.07).exp())
    backbone.train(was_training)
    return float((votes.argmax(1) == val_y).float().mean() * 100)


def independent_moco(images: torch.Tensor, s: Setting) -> tuple[nn.Module, list[float]]:
    """MoCo v2 (mlp head, aug+ without blur at 32 px, cosine lr) from torchvision parts only.
    Returns the trained backbone and the mean MoCo loss of every epoch."""
    torch.manual_seed(s.seed)
    backbone = torchvision.models.resnet18()
    backbone.fc = nn.Identity()
    query = nn.Sequential(backbone, nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    key = copy.deepcopy(query).requires_grad_(False)
    queue = F.normalize(torch.randn(128, s.moco_k), dim=0)
    pointer = 0
    augment = v2.Compose([v2.RandomResizedCrop(images.shape[-1], scale=(0.2, 1.0), antialias=True),
                          v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                          v2.RandomGrayscale(0.2), v2.RandomHorizontalFlip()])
    optimizer = torch.optim.SGD(query.parameters(), lr=s.lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = len(images) // s.batch_size
    total, step, epoch_losses = s.epochs * steps_per_epoch, 0, []
    for _ in range(s.epochs):
        order, losses = torch.randperm(len(images)), []
        for b in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = s.lr * 0.5 * (1 + np.cos(np.pi * step / total))
            step += 1
            batch = images[order[b * s.batch_size:(b + 1) * s.batch_size]]
            view_q = to_input(torch.stack([augment(im) for im in batch]))
            view_k = to_input(torch.stack([augment(im) for im in batch]))
            q = F.normalize(query(view_q), dim=1)
            with torch.no_grad():
                for p_k, p_q in zip(key.parameters(), query.parameters()):
                    p_k.mul_(s.moco_m).add_(p_q, alpha=1 - s.moco_m)
                shuffle = torch.randperm(len(batch))
                shuffled = torch.cat([key(part) for part in view_k[shuffle].chunk(s.key_groups)])
                k = torch.empty_like(shuffled)
                k[shuffle] = shuffled
                k = F.normalize(k, dim=1)
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / s.moco_t
            loss = F.cross_entropy(logits, torch.zeros(len(batch), dtype=torch.long))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            slots = (pointer + torch.arange(len(batch))) % s.moco_k
            queue[:, slots] = k.t()
            pointer = (pointer + len(batch)) % s.moco_k
            losses.append(float(loss.detach()))
        epoch_losses.append(float(np.mean(losses)))
    return backbone, epoch_losses


def cclnb_moco(images: np.ndarray, targets: np.ndarray, s: Setting, lr: float) -> tuple[nn.Module, list[float]]:
    """The same run through cclnb's Trainer (Joint: one task of every class), fp32 as above."""
    config = TrainConfig(method="Joint", arch="resnet18", stem="imagenet", image_size=images.shape[1],
                         batch_size=s.batch_size, lr=lr, moco_k=s.moco_k, moco_m=s.moco_m, moco_t=s.moco_t,
                         mlp=True, aug_plus=True, cos=True, epochs=s.epochs, n_tasks=2, seed=s.seed,
                         bn_groups=1, key_bn_groups=s.key_groups, precision="fp32", device="cpu",
                         progress=False)
    trainer = Trainer.from_images(config, images, targets)
    trainer.start_task(0)
    epoch_losses = []
    for _ in range(s.epochs):
        results = trainer.run_epoch()
        epoch_losses.append(float(torch.stack([r.losses["moco"] for r in results]).mean()))
    return trainer.model.encoder_q.backbone, epoch_losses


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="demo-digits",
                        help="demo-digits (what the recorded table used), demo, or an ImageNet-layout zip/folder")
    parser.add_argument("--subset-per-class", type=int, default=None, help="first N train images per class")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--moco-k", type=int, default=256)
    parser.add_argument("--moco-m", type=float, default=0.99)
    parser.add_argument("--moco-t", type=float, default=0.2)
    parser.add_argument("--key-groups", type=int, default=2)
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Setting(args.epochs, args.batch_size, args.lr, args.moco_k, args.moco_m, args.moco_t,
                args.key_groups, args.seed, args.knn_k)

    train_ds, val_ds = open_dataset(args.data, "train"), open_dataset(args.data, "val")
    train_np, train_y = load_uint8(train_ds, progress=False), np.asarray(train_ds.targets)
    if args.subset_per_class:
        keep = np.sort(np.concatenate([np.flatnonzero(train_y == c)[:args.subset_per_class]
                                       for c in np.unique(train_y)]))
        train_np, train_y = train_np[keep], train_y[keep]
    train = torch.from_numpy(train_np).permute(0, 3, 1, 2).contiguous()
    val = torch.from_numpy(load_uint8(val_ds, progress=False)).permute(0, 3, 1, 2).contiguous()
    ty, vy = torch.as_tensor(train_y), torch.as_tensor(np.asarray(val_ds.targets))
    n_classes = len(train_ds.classes)

    def knn(backbone: nn.Module) -> float:
        return knn_accuracy(backbone, train, ty, val, vy, s.knn_k, n_classes)

    torch.manual_seed(s.seed)
    untrained = torchvision.models.resnet18()
    untrained.fc = nn.Identity()
    rows = [("untrained (initial weights, BatchNorm statistics at their initial 0/1)", [], knn(untrained), 0.0)]
    for name, run in (("cclnb Trainer", lambda: cclnb_moco(train_np, train_y, s, s.lr)),
                      ("independent loop (torchvision parts only)", lambda: independent_moco(train, s)),
                      ("cclnb Trainer, lr 0 (only BatchNorm statistics move)",
                       lambda: cclnb_moco(train_np, train_y, s, 0.0))):
        tic = time.perf_counter()
        backbone, losses = run()
        rows.append((name, losses, knn(backbone), time.perf_counter() - tic))
        print(f"{name}: {rows[-1][2]:.2f}% kNN, losses {[round(x, 3) for x in losses]}", flush=True)

    chance = float(np.log(s.moco_k + 1))
    lines = [f"# MoCo v2 cross-check: cclnb against an independent loop ({args.data})", "",
             f"`python benchmarks/moco_crosscheck.py {' '.join(argv)}`",
             f"{datetime.date.today()}, commit {short_commit(git_commit(), 12)}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {args.threads} threads, fp32.", "",
             f"Setting: {len(train)} train images, {n_classes} classes, ResNet-18 (ImageNet stem) at "
             f"{train.shape[-1]} px, {s.epochs} epochs, batch {s.batch_size}, lr {s.lr} (cosine), "
             f"queue {s.moco_k} (ln(K+1) = {chance:.2f}), key momentum {s.moco_m}, T {s.moco_t}, "
             f"keys shuffled in {s.key_groups} BatchNorm groups, seed {s.seed}; kNN: k {s.knn_k} on "
             f"{len(val)} val images.", "",
             "| encoder | MoCo loss per epoch | kNN top-1 (%) | train time (s) |", "|---|---|---|---|"]
    for name, losses, accuracy, seconds in rows:
        per_epoch = ", ".join(f"{x:.2f}" for x in losses) or "-"
        lines.append(f"| {name} | {per_epoch} | {accuracy:.2f} | {seconds:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main()
