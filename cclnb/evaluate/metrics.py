"""Continual-learning summaries of an accuracy matrix (pure NumPy, no torch).

`R` is a square (T, T) array: `R[i][j]` = accuracy (percent) on the val images of task j's
classes, measured after training task i. In cclnb the classifier (kNN or probe) always spans all
classes, so the entries above the diagonal (tasks not trained yet) are real measurements too: a
self-supervised encoder can classify classes it never saw. The functions below read only what
their definitions need, so they are unaffected by how those upper entries are used.

Definitions (T tasks, indices from 0):
- average accuracy after task i:  A_i = mean_{j <= i} R[i][j]              (Lopez-Paz & Ranzato 2017)
- forgetting of task j < T-1:     f_j = max_{j <= l <= T-2} R[l][j] - R[T-1][j]  (Chaudhry et al. 2018)
- average forgetting:             F   = mean_{j < T-1} f_j
- backward transfer:              BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])   (Lopez-Paz & Ranzato 2017)

Cross-check with Avalanche (`avalanche/evaluation/metrics/forgetting_bwt.py`): its
`StreamForgetting` is, per experience j, the accuracy "after first training on" j minus the
accuracy now, averaged over the experiences trained before the current one, i.e.
mean_{j<T-1} (R[j][j] - R[T-1][j]); its `StreamBWT` is defined as minus that. So Avalanche's
BWT equals `backward_transfer(R)` here, and Avalanche's forgetting equals `-backward_transfer(R)`.
Our `average_forgetting` follows Chaudhry et al. instead (best accuracy since the task was
learned, not the accuracy right after it), which is never smaller than Avalanche's number; the two
agree whenever a task's accuracy peaks right after it is learned.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cclnb.errors import ConfigError

Matrix = Sequence[Sequence[float]] | np.ndarray


def _as_matrix(R: Matrix, min_tasks: int = 1) -> np.ndarray:
    """Validate `R` (square, finite, at least `min_tasks` tasks) and return it as float64."""
    arr = np.asarray(R, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ConfigError(f"accuracy matrix must be square (T, T) with R[i][j] = accuracy on task j "
                          f"after task i; got shape {arr.shape}. Pass one row per trained task.")
    if arr.shape[0] < min_tasks:
        raise ConfigError(f"this metric needs at least {min_tasks} tasks, the matrix has {arr.shape[0]}; "
                          f"it is undefined for a single task")
    if not np.all(np.isfinite(arr)):
        raise ConfigError("accuracy matrix contains NaN or infinite entries; re-run the missing "
                          "evaluations before summarising")
    return arr


def average_accuracy(R: Matrix) -> list[float]:
    """A_i = mean over the tasks seen so far (j <= i) of R[i][j], for every row i.

    The last value is the usual "final average accuracy"; the whole list is the curve the
    notebooks plot against the number of tasks learned.
    """
    arr = _as_matrix(R)
    return [float(arr[i, : i + 1].mean()) for i in range(arr.shape[0])]


def forgetting_per_task(R: Matrix, since_learned: bool = True) -> list[float]:
    """f_j = max over earlier rows l <= T-2 of R[l][j], minus the final R[T-1][j], for j < T-1.

    With `since_learned` (default, Chaudhry et al. 2018) the max runs over l in [j, T-2], the
    rows after task j was learned. `since_learned=False` takes the max over all rows l < T-1,
    which in the self-supervised setting also counts an unseen task's accuracy before it was
    trained (useful when an encoder transfers well to classes it has not met yet).
    Positive values mean accuracy was lost; the last task has no forgetting and is omitted.
    """
    arr = _as_matrix(R, min_tasks=2)
    last = arr.shape[0] - 1
    return [float(arr[(j if since_learned else 0):last, j].max() - arr[last, j]) for j in range(last)]


def average_forgetting(R: Matrix, since_learned: bool = True) -> float:
    """F = mean over tasks j < T-1 of `forgetting_per_task(R)[j]` (see there)."""
    return float(np.mean(forgetting_per_task(R, since_learned)))


def backward_transfer(R: Matrix) -> float:
    """BWT = mean over j < T-1 of (R[T-1][j] - R[j][j]): final minus just-learned accuracy.

    Negative values are forgetting; this equals Avalanche's `StreamBWT` (module docstring).
    """
    arr = _as_matrix(R, min_tasks=2)
    last = arr.shape[0] - 1
    return float(np.mean(arr[last, :last] - np.diag(arr)[:last]))
