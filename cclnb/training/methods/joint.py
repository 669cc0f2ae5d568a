"""Joint: the i.i.d. upper bound, one task holding every class of the sequence."""

from __future__ import annotations

import numpy as np

from cclnb.training.methods.base import Method


class Joint(Method):
    """MoCo v2 on all classes at once. With `epochs` epochs over the whole set it takes as many
    optimizer steps as the sequence (n tasks x epochs x N/n images); its accuracy matrix has one
    row, measured on the sequence's task split so its columns compare with the other methods'."""

    name = "Joint"

    def training_tasks(self, task_ids: list[np.ndarray]) -> list[np.ndarray]:
        return [np.sort(np.concatenate(task_ids))]
