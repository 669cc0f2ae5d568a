"""One CCL training step, term by term, for the exploration notebook.

CCL's loss is MoCo's InfoNCE plus two terms that only exist from the second task on: the
extra-sample-queue InfoNCE and the distillation of the teacher's similarity structure on the
replayed images. Reading them off one real step (the trainer's own `train_step`, driven through its
public API) shows what each term looks at: the MoCo logits (the positive key against the queue)
and, for the replayed rows of the batch, the student's and the teacher's softmax similarities that
the KL term pulls together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from cclnb.config import TrainConfig
from cclnb.training import Trainer

# A step small enough for a notebook on a CPU: a few images per class, a small queue.
QUICK = {"subset_per_class": 30, "batch_size": 32, "epochs": 2, "moco_k": 256, "ccl_k": 64, "n_save": 5,
         "bn_groups": 2, "key_bn_groups": 4, "eval_each_task": "none", "progress": False}


@dataclass
class CclStep:
    """The terms of one CCL step at the second task (teacher in train mode, its second epoch)."""

    losses: dict[str, float]        # total, moco, extra, distill (weighted as in training)
    logits: np.ndarray              # (b, 1 + K) MoCo logits / T, column 0 the positive
    student_sim: np.ndarray         # (n, n) softmax(q_old . anchor_old / t_student) per row
    teacher_sim: np.ndarray         # (n, n) softmax(teacher's q_old . anchor_old / t_teacher)
    n_old: int                      # replayed rows in the batch
    batch_size: int


def ccl_step(config: TrainConfig, images: np.ndarray, targets: np.ndarray, device: str = "cpu",
             quick: bool = True) -> CclStep:
    """Train CCL's first task briefly on `images` (uint8 (N, H, W, 3); `targets` only split the
    tasks), then run one step of the second task on its first batch that holds replayed images.

    `config`'s data settings and method options are kept; with `quick` the sizes of `QUICK`
    replace its budget (a step in seconds on a CPU)."""
    cfg = dataclasses.replace(config, method="CCL", **(QUICK if quick else {}))
    trainer = Trainer.from_images(cfg, images, targets, device)
    cfg = trainer.config                          # resolved: CCL's options with their defaults
    trainer.start_task(0)
    for _ in range(cfg.epochs):
        trainer.run_epoch()
    trainer.finish_task()
    trainer.start_task(1)
    trainer.epoch = min(1, cfg.epochs - 1)       # a typical epoch: the teacher in train mode
    trainer.begin_epoch()
    batch = next((b for b in trainer.epoch_batches() if b.old_rows.any()), None)
    if batch is None:
        raise ValueError("no batch of the second task holds a replayed image; raise n_save")
    result = trainer.train_step(batch)
    old = torch.from_numpy(batch.old_rows).to(result.q.device)

    def similarities(q: torch.Tensor, a: torch.Tensor, t: float) -> np.ndarray:
        q, a = F.normalize(q[old].float(), dim=1), F.normalize(a[old].float(), dim=1)
        return torch.softmax(q @ a.t() / t, dim=1).cpu().numpy()

    d = result.details
    return CclStep(losses={k: float(v) for k, v in result.losses.items()},
                   logits=result.logits.float().cpu().numpy(),
                   student_sim=similarities(result.q, d["student_anchor"], cfg.ccl_t_student),
                   teacher_sim=similarities(d["teacher_q"], d["teacher_anchor"], cfg.ccl_t_teacher),
                   n_old=int(batch.old_rows.sum()), batch_size=len(batch.old_rows))


def ccl_step_figure(step: CclStep) -> Figure:
    """Three panels: MoCo logits (positive vs queue), the student's and the teacher's similarity
    distributions over the replayed rows (what the distillation KL compares row by row)."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    negatives, positives = step.logits[:, 1:].ravel(), step.logits[:, 0]
    axes[0].hist(negatives, bins=60, density=True, alpha=0.6, label="queue (negatives)")
    axes[0].hist(positives, bins=20, density=True, alpha=0.7, label="positive key")
    axes[0].set(title=f"MoCo logits q.k / T (loss {step.losses['moco']:.3f})", xlabel="logit",
                ylabel="density")
    axes[0].legend(fontsize=8)
    for ax, sim, who in ((axes[1], step.student_sim, "student"), (axes[2], step.teacher_sim, "teacher")):
        image = ax.imshow(sim, vmin=0, vmax=1, cmap="viridis")
        ax.set(title=f"{who}: softmax similarity, {step.n_old} replayed rows",
               xlabel="anchor view of replayed image", ylabel="q view of replayed image")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"one CCL step ({step.batch_size} images): total {step.losses['total']:.3f} = "
                 f"MoCo {step.losses['moco']:.3f} + extra queue {step.losses['extra']:.3f} + "
                 f"distillation {step.losses['distill']:.4f}")
    return fig
