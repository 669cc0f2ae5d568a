"""What a continual method is: a few hooks on the shared MoCo v2 trainer.

Following solo-learn's design, the trainer owns the loop (data, MoCo step, optimizer, logging,
checkpoints) and a method adds only what makes it different: which earlier samples it replays,
which loss terms it adds, and what it does at task and epoch boundaries. A method file therefore
reads like the paper's paragraph about that method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from cclnb.config import TrainConfig

if TYPE_CHECKING:
    from cclnb.data.batches import Batch
    from cclnb.training.dist import DistContext
    from cclnb.training.models import MoCo


@dataclass
class StepOutputs:
    """What one MoCo step computed, for a method's extra losses (this rank's rows)."""

    q: torch.Tensor            # (b, dim) L2-normalized student embedding of view q (with grad)
    k: torch.Tensor            # (b, dim) L2-normalized momentum-key embedding of view k
    details: dict[str, torch.Tensor] = field(default_factory=dict)   # a method's inspectable terms


@dataclass
class TrainerEnv:
    """The trainer's services a method may use (never the labels: there are none here)."""

    config: TrainConfig
    model: "MoCo"
    ctx: "DistContext"
    seed: int
    classes_per_task: int      # C / n_tasks, the authors' cluster count and replay unit
    # views(ids, n_views, batch_size, generator) -> iterator of (views (V,b,...), anchor (b,...))
    views: Callable[..., Iterator[tuple[torch.Tensor, torch.Tensor]]]
    log: Callable[[str], None]
    autocast: Callable[[], Any]
    encode_q: Callable[[torch.Tensor], torch.Tensor]   # the query encoder (compiled when asked)
    bn_groups: int = 1         # BatchNorm groups of this rank's train-mode forwards (`grouped_forward`)


class Method:
    """Finetuning's behaviour (plain MoCo on the current task); subclasses override hooks."""

    name = "Finetuning"
    uses_replay = False
    selection = "none"

    def __init__(self, env: TrainerEnv) -> None:
        self.env = env
        self.config = env.config

    # ---------------------------------------------------------------- the sequence of tasks
    def training_tasks(self, task_ids: list[np.ndarray]) -> list[np.ndarray]:
        """The sample ids trained on, task by task (Joint merges them into one task)."""
        return task_ids

    # ---------------------------------------------------------------- boundaries
    def on_task_start(self, task: int) -> None:
        """Called before the first epoch of `task` (not again when a resume lands mid-task)."""

    def on_epoch_start(self, task: int, epoch: int) -> None:
        """Called before every epoch, resumed ones included."""

    def on_epoch_end(self, task: int, epoch: int) -> None:
        """Called after every epoch."""

    # ---------------------------------------------------------------- the step
    def extra_losses(self, task: int, batch: "Batch", out: StepOutputs) -> dict[str, torch.Tensor]:
        """Loss terms added to MoCo's, *already weighted*, keyed "extra" / "distill". A method may
        also put tensors worth inspecting into `out.details` (returned by `Trainer.train_step`)."""
        return {}

    def after_step(self, batch: "Batch", keys_all: torch.Tensor, is_old_all: torch.Tensor) -> None:
        """After the optimizer step, with every rank's keys and flags (in rank order)."""

    def teacher_encoder(self) -> torch.nn.Module | None:
        """The encoder a method keeps besides the student, for `--eval-teacher` (None: none)."""
        return None

    def synced_modules(self) -> list[torch.nn.Module]:
        """Modules whose buffers (BatchNorm statistics) rank 0 broadcasts after each step under
        DDP, so every rank holds the same state (CCL's teacher in train mode)."""
        return []

    # ---------------------------------------------------------------- replay
    def select_replay(self, task: int, task_ids: np.ndarray) -> np.ndarray:
        """Sample ids of the finished `task` to replay later, chosen without labels."""
        return np.zeros(0, dtype=np.int64)

    def replay_budget(self) -> int:
        """`n_save * C/n`: how many ids of a task the authors keep."""
        return self.config.n_save * self.env.classes_per_task

    # ---------------------------------------------------------------- state (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (nothing for stateless methods)."""
