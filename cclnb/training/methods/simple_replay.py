"""SimpleReplay: MoCo v2 on the current task plus images of earlier tasks drawn at random."""

from __future__ import annotations

import numpy as np

from cclnb.training.methods.base import Method
from cclnb.training.replay import select_random


class SimpleReplay(Method):
    """After each task keep `n_save * C/n` of its ids, drawn uniformly; like the authors' code the
    draw is with replacement by default (`replay_with_replacement`), so duplicates can occur and
    are replayed twice. Labels are never looked at."""

    name = "SimpleReplay"
    aliases = ("SR",)
    uses_replay = True
    selection = "random"

    def select_replay(self, task: int, task_ids: np.ndarray) -> np.ndarray:
        return random_replay(self, task, task_ids)


def random_replay(method: Method, task: int, task_ids: np.ndarray) -> np.ndarray:
    """The random draw shared by SimpleReplay and CCL's `--ccl-selection random` ablation,
    seeded by (seed, task) so a resumed run draws the same ids."""
    n = method.replay_budget()
    with_replacement = method.config.replay_with_replacement
    if n > len(task_ids):
        what = ("drawing with replacement, so the buffer holds duplicates" if with_replacement else
                "which is impossible without replacement")
        method.env.log(f"replay: task {task} has {len(task_ids)} images but n_save*C/n = {n} are "
                       f"kept; {what}")
    rng = np.random.default_rng([method.env.seed, task, 1])
    return select_random(task_ids, n, rng, with_replacement)
