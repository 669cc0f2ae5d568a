"""The measurement after every task of a run: the encoder's kNN / probe accuracy on each task.

`task_evaluator` is the `EvaluatorFactory` the training stage calls back (`cclnb.train` passes
it): it opens the validation split, binds the labels the trainer never sees, and returns the
function that fills the run's eval/acc_<protocol>_<who>.csv, one row per finished task. Under
torchrun every rank evaluates, each extracting a share of the features (`extract_features`),
so the GPUs of a multi-GPU job share the work instead of waiting for rank 0; rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cclnb.config import TrainConfig
from cclnb.data import ImageDataset, load_uint8, open_run_data, subset_per_class
from cclnb.evaluate.encoder import evaluate_encoder
from cclnb.training import dist, runs
from cclnb.training.events import EventWriter
from cclnb.training.loop import Evaluator
from cclnb.training.plan import TaskPlan


class _IdSubset:
    """`dataset` restricted to `ids`, for evaluation through the PIL path (large images)."""

    def __init__(self, dataset, ids: np.ndarray) -> None:
        self.dataset, self.ids = dataset, ids
        self.image_size = dataset.image_size

    def __len__(self) -> int:
        return len(self.ids)

    def load_pil(self, i: int):
        return self.dataset.load_pil(int(self.ids[i]))


def eval_inputs(config: TrainConfig, dataset, ids: np.ndarray | None = None, progress: bool | None = None):
    """The images `ids` (default: all) of `dataset` as the evaluation functions take them: decoded
    uint8 arrays on the tensor loader, a lazily decoded subset on the worker loader."""
    if config.loader == "tensor":
        return load_uint8(dataset, ids=ids, progress=config.progress if progress is None else progress)
    return dataset if ids is None else _IdSubset(dataset, ids)


def task_evaluator(config: TrainConfig, train_ds: ImageDataset, plan: TaskPlan, run_dir: Path,
                   ctx: dist.DistContext) -> Evaluator | None:
    """The per-task evaluation (`evaluate_encoder`), with the labels bound here so that the
    trainer never holds them. Every rank evaluates its share; rank 0 writes the
    eval/acc_<protocol>_<who>.csv rows."""
    if config.eval_each_task == "none":
        return None
    progress = config.progress and ctx.is_main
    val_ds = open_run_data(config, "val")
    train_ids = plan.all_ids
    if config.eval_bank_per_class is not None:   # a smaller bank: cheaper per-task evaluation
        train_ids = train_ids[subset_per_class(train_ds.targets[train_ids], config.eval_bank_per_class)]
    small = config.small_images
    train_images = eval_inputs(config, train_ds, train_ids, progress)
    if len(plan.classes) < plan.n_classes:   # --train-tasks: measured on the classes trained on
        val_ids = np.flatnonzero(np.isin(val_ds.targets, plan.classes))
        val_images, val_y = eval_inputs(config, val_ds, val_ids, progress), val_ds.targets[val_ids]
    else:
        val_images, val_y = eval_inputs(config, val_ds, progress=progress), val_ds.targets
    train_y = train_ds.targets[train_ids]
    events = EventWriter(run_dir) if config.tensorboard and ctx.is_main else None   # beside the trainer's

    def evaluate(backbone: torch.nn.Module, after_task: int, who: str) -> None:
        results = evaluate_encoder(backbone, train_images, train_y, val_images, val_y, plan.task_classes,
                                   config.eval_each_task, ctx.device, knn_k=config.knn_k, knn_t=config.knn_t,
                                   precision=config.precision, n_classes=plan.n_classes,
                                   batch_size=max(256, config.batch_size),
                                   image_size=None if small else config.image_size, progress=progress, ctx=ctx)
        if not ctx.is_main:
            return
        for protocol, result in results.items():
            runs.write_accuracy_row(run_dir, protocol, who, after_task, result["per_task"], result["all"])
            if events is not None:
                events.scalars(f"eval/{protocol}_{who}", {**{f"task_{j}": a for j, a in enumerate(result["per_task"])},
                                                          "all": result["all"]}, after_task)

    return evaluate
