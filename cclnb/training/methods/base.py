"""What a continual method is: a declaration and a few hooks on the shared MoCo v2 trainer.

Following solo-learn's design, the trainer owns the loop (data, MoCo step, optimizer, logging,
checkpoints) and a method adds only what makes it different: which earlier samples it replays,
which loss terms it adds, which modules of its own it trains, and what it does at task and epoch
boundaries. A method file therefore reads like the paper's paragraph about that method.

What the rest of cclnb needs to know about a method it reads from the class, never from its name:
its options (`Options`, a dataclass: `cclnb train` flags, notebook parameters, config.json and the
records all follow from it), its loss terms (`loss_terms`: train_log.csv columns and the report's
loss figure), its cost (`step_cost`: the study's job order), whether it keeps a teacher worth a
linear evaluation (`keeps_teacher`), its variants (ablations run as methods of their own) and
aliases. `cclnb.training.methods.registry` finds the classes (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

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
    z: torch.Tensor | None = None   # (b, dim) the student's projection of view q before the
    #   normalization (with grad, at least fp32): what a predictor on the projection reads
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

    name: ClassVar[str] = "Finetuning"
    aliases: ClassVar[tuple[str, ...]] = ()          # other spellings `--method` accepts
    Options: ClassVar[type | None] = None            # a dataclass of the method's options (flat, prefixed names)
    variants: ClassVar[dict[str, dict[str, Any]]] = {}   # study methods that are this one with options set
    loss_terms: ClassVar[tuple[str, ...]] = ()       # the weighted terms `extra_losses` returns, in log order
    step_cost: ClassVar[float] = 1.0                 # time of a step relative to Finetuning's (job order)
    keeps_teacher: ClassVar[bool] = False            # `teacher_encoder()` deserves its own linear evaluation
    uses_replay: ClassVar[bool] = False              # the trainer feeds `select_replay`'s ids to later tasks
    selection: str = "none"                          # how replay ids are chosen (replay/ files, logs)

    def __init__(self, env: TrainerEnv) -> None:
        self.env = env
        self.config = env.config
        self.options = self.Options(**env.config.method_options) if self.Options is not None else None

    # ---------------------------------------------------------------- what it trains
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules of the method's own that train with the encoder (a predictor, say), by name.
        The trainer's optimizer steps them, DDP averages their gradients, the step's autocast
        covers them, checkpoints save and restore them and they follow the model's train/eval
        mode. Build them in `__init__`, on the model's device."""
        return {}

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
    def before_step(self, task: int, batch: "Batch", generator: torch.Generator) -> "Batch":
        """The batch the MoCo step trains on (LUMP mixes its views with buffered images here).
        `generator` is the epoch's generator, whose state a mid-epoch checkpoint keeps."""
        return batch

    def extra_losses(self, task: int, batch: "Batch", out: StepOutputs) -> dict[str, torch.Tensor]:
        """Loss terms added to MoCo's, *already weighted*, keyed by names of `loss_terms` (a term
        left out of the dict counts as 0). Called inside the step's autocast. A method may also
        put tensors worth inspecting into `out.details` (returned by `Trainer.train_step`)."""
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
        """The method's state besides `trainable_modules` (which the trainer saves): buffers,
        frozen copies, counters."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (nothing for stateless methods)."""
