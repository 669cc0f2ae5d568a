"""What a run will do, fixed before it starts: the task split and the config's resolved values.

The split is the only place labels are used: `plan_tasks` turns them into sample ids per task,
and from then on training sees ids and pixels only. `resolve_config` fills the values that
depend on the data and the machine, once, so that a resume can keep them.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from cclnb.config import TrainConfig
from cclnb.data import subset_per_class
from cclnb.data.tasks import class_order, split_classes, task_sample_ids
from cclnb.training.precision import resolve_model_precision

SMALL_IMAGE_MAX = 64


@dataclass
class TaskPlan:
    """The class split, fixed before training: the only place labels are used."""

    task_classes: list[np.ndarray]     # class ids of each task (the sequence's split)
    task_ids: list[np.ndarray]         # sorted sample ids of each task
    n_classes: int

    @property
    def classes_per_task(self) -> int:
        return len(self.task_classes[0])

    @property
    def classes(self) -> np.ndarray:
        """Every class the plan trains on (all of the data's, unless --train-tasks cuts the sequence)."""
        return np.concatenate(self.task_classes)

    @property
    def all_ids(self) -> np.ndarray:
        return np.sort(np.concatenate(self.task_ids))


def plan_tasks(config: TrainConfig, targets: np.ndarray, n_classes: int) -> TaskPlan:
    """Class order (seed `order_seed`, 1 = the authors'), split into `n_tasks`, sample ids per task
    (restricted to the first `subset_per_class` images of each class when set). With `train_tasks`
    only the first tasks of that split remain: a short protocol on the start of the same sequence."""
    ids = None if config.subset_per_class is None else subset_per_class(targets, config.subset_per_class)
    task_classes = split_classes(class_order(n_classes, config.order_seed), config.n_tasks)[:config.train_tasks]
    return TaskPlan(task_classes, task_sample_ids(targets, task_classes, ids), n_classes)


def resolve_config(config: TrainConfig, data_image_size: int | None,
                   device: torch.device | None = None) -> TrainConfig:
    """Fill the values that depend on the data and the machine: image size (the data's own when
    <= 64 px, else 224, the authors'), the loader, the precision (`auto` -> bf16 where native on
    `device` and, on a CPU, convolutions large enough to gain; default device: the one `config.device`
    names), the seed (drawn and recorded when not given, so that a resume continues the same
    random streams)."""
    image_size = config.image_size
    if image_size is None:
        image_size = data_image_size if data_image_size and data_image_size <= SMALL_IMAGE_MAX else 224
    loader = config.loader
    if loader == "auto":
        loader = "tensor" if data_image_size and image_size <= SMALL_IMAGE_MAX else "workers"
    seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
    if device is None:
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if use_cuda else "cpu")
    precision = resolve_model_precision(config.precision, device, config.stem, image_size <= SMALL_IMAGE_MAX,
                                        image_size)
    return dataclasses.replace(config, image_size=image_size, loader=loader, seed=seed,
                               precision=precision)
