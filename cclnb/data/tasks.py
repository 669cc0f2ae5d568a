"""Class order and class-incremental task splits (labels only, no images).

The authors seed NumPy's legacy *global* RNG with 1 and shuffle `arange(C)`; task t owns the t-th
of `n_tasks` equal chunks. `class_order` reproduces that order exactly with a private
`RandomState` (the legacy global RNG *is* a `RandomState`, so the sequence is identical) and
therefore leaves the caller's global RNG state untouched.
"""

from __future__ import annotations

import numpy as np

from cclnb.errors import ConfigError


def class_order(n_classes: int, seed: int = 1) -> np.ndarray:
    """The shuffled class indices: `np.random.seed(seed); np.random.shuffle(arange(n))` exactly."""
    if n_classes < 1:
        raise ConfigError(f"class_order needs at least one class, got {n_classes}")
    order = np.arange(n_classes)
    np.random.RandomState(seed).shuffle(order)
    return order


def split_classes(order: np.ndarray, n_tasks: int) -> list[np.ndarray]:
    """Cut the class order into `n_tasks` equal, consecutive chunks (task t = chunk t)."""
    order = np.asarray(order)
    n_classes = len(order)
    if n_tasks < 1 or n_classes % n_tasks != 0:
        valid = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
        raise ConfigError(f"{n_classes} classes cannot be split into {n_tasks} equal tasks; "
                          f"choose --n-tasks from {', '.join(map(str, valid))}")
    return [chunk.copy() for chunk in np.split(order, n_tasks)]


def task_sample_ids(targets: np.ndarray, task_classes: list[np.ndarray],
                    ids: np.ndarray | None = None) -> list[np.ndarray]:
    """For each task, the sorted sample ids (among `ids`, default all) whose label is in its classes."""
    targets = np.asarray(targets)
    candidates = np.arange(len(targets)) if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
    labels = targets[candidates]
    return [candidates[np.isin(labels, classes)].astype(np.int64) for classes in task_classes]
