"""CCL (Lin, Wang, Lin 2021): MoCo v2 + replay of steady images + extra sample queue + distillation.

From the second task on, two terms join MoCo's loss (each weighted 0.1 by default):
1. the *extra sample queue*: InfoNCE of every query against a small queue (`ccl_k`) that starts as
   the first `ccl_k` keys of the main queue and afterwards receives only keys of replayed images;
2. *self-supervised distillation* on the replayed images of a batch: the student's similarities
   between its q-view and anchor-view embeddings are pulled towards a momentum teacher's.
At every task start the teacher's and MoCo's key encoder's *parameters* are reset to the student's
(each keeps its own BatchNorm statistics, as in the authors' code); the teacher follows the student
by EMA once per epoch. Replay keeps, per k-means cluster of the anchor embeddings, the `n_save`
images whose embedding varies least over 6 MoCo v2 views + the anchor view. No labels anywhere.

Behaviours of the authors' code that are explicit switches (defaults = the code):
`ccl_teacher_mode` "code" puts the teacher in train mode from a task's second epoch on (a side
effect of their `model.train()`), "eval" keeps it in eval mode; `ccl_teacher_stats` "own" lets the
teacher keep its own BatchNorm statistics at a reset (a fresh network's at the second task, what
it gathered in train mode afterwards), "student" copies the student's; `ccl_distill_group` 32
computes the distillation within 32-sample slices (what each of their 8 GPUs saw), 0 over the
whole batch. As in their code, the student's anchor pass and the teacher's two passes run only on
batches that hold a replayed image (per emulated GPU for the BatchNorm statistics).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cclnb.errors import ConfigError
from cclnb.training.losses import at_least_fp32, distillation_kl, info_nce_queue
from cclnb.training.methods.base import Method, StepOutputs, TrainerEnv
from cclnb.training.methods.simple_replay import random_replay
from cclnb.training.models import MoCo, copy_parameters, grouped_forward, reset_bn_statistics
from cclnb.training.replay import select_min_variance

if TYPE_CHECKING:
    from cclnb.data.batches import Batch

N_SELECTION_VIEWS = 6   # MoCo v2 views per image for the min-variance score (+ the anchor view)


class KeyQueue(nn.Module):
    """A FIFO queue of keys (dim, K) with the same write rule as MoCo's main queue."""

    queue: torch.Tensor
    queue_ptr: torch.Tensor
    enqueue = MoCo.enqueue    # one implementation of the FIFO write for both queues

    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.register_buffer("queue", torch.zeros(dim, k))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def fill_from(self, keys: torch.Tensor) -> None:
        """Start from `keys` (dim, K) and write the next key over the first column."""
        self.queue.copy_(keys)
        self.queue_ptr.zero_()


def _choice(value: str, option: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{option} must be {' or '.join(choices)}, got {value!r}")


@dataclass
class CCLOptions:
    """CCL's options: the authors' two flags (`--ccl-teacher-m`, `--ccl-k`, same defaults) and
    cclnb's switches for taking CCL apart, each defaulting to what the authors' code does."""

    ccl_teacher_m: float = field(default=0.996, metadata={"help": "EMA momentum of the teacher, once per epoch (the authors' flag)"})
    ccl_k: int = field(default=256, metadata={"help": "length of the extra queue of replayed keys (the authors' flag)"})
    ccl_selection: str = field(default="min_var", metadata={"help": "replay selection: min_var (the paper's) or random", "choices": ("min_var", "random")})
    ccl_extra_queue: bool = field(default=True, metadata={"help": "the extra sample queue of replayed keys"})
    ccl_distill: bool = field(default=True, metadata={"help": "the self-distillation from the momentum teacher"})
    ccl_teacher_mode: str = field(default="code", metadata={"help": "code: train mode from a task's second epoch (the authors' side effect); eval", "choices": ("code", "eval")})
    ccl_teacher_stats: str = field(default="own", metadata={"help": "own (the authors'): a task start copies the student's parameters into the teacher, which keeps its own BatchNorm statistics; student: also copy them", "choices": ("own", "student")})
    ccl_distill_group: int = field(default=32, metadata={"help": "distill within slices of N samples (the authors' per-GPU 32); 0 = the whole batch"})
    ccl_extra_weight: float = field(default=0.1, metadata={"help": "weight of the extra-queue loss"})
    ccl_distill_weight: float = field(default=0.1, metadata={"help": "weight of the distillation loss"})
    ccl_t_student: float = field(default=0.07, metadata={"help": "temperature of the student's similarities"})
    ccl_t_teacher: float = field(default=0.04, metadata={"help": "temperature of the teacher's similarities"})

    def __post_init__(self) -> None:
        _choice(self.ccl_selection, "ccl-selection", ("min_var", "random"))
        _choice(self.ccl_teacher_mode, "ccl-teacher-mode", ("code", "eval"))
        _choice(self.ccl_teacher_stats, "ccl-teacher-stats", ("own", "student"))
        if self.ccl_distill_group < 0:
            raise ConfigError("--ccl-distill-group must be >= 0 (0 = whole batch)")


class CCL(Method):
    name = "CCL"
    aliases = ("CLL",)     # the authors' README spelling
    Options = CCLOptions
    # CCL taken apart: each ablation is CCL with one of its two additions switched off; a study
    # runs them as methods of their own (a record, a row, paired differences), named for what they drop.
    variants = {"CCL-no-distill": {"ccl_distill": False}, "CCL-no-extra-queue": {"ccl_extra_queue": False}}
    loss_terms = ("extra", "distill")
    # A third encoder (the teacher) runs on the replayed share of every step: the demo's CCL took
    # 69-73 s against Finetuning's 41-43 s.
    step_cost = 1.7
    keeps_teacher = True
    uses_replay = True

    def __init__(self, env: TrainerEnv) -> None:
        super().__init__(env)
        cfg = self.config
        if cfg.ccl_extra_queue and not 1 <= cfg.ccl_k <= cfg.moco_k:
            raise ConfigError(f"--ccl-k {cfg.ccl_k} must be between 1 and --moco-k {cfg.moco_k}: the "
                              f"extra queue starts as the main queue's first ccl-k keys")
        self.selection = cfg.ccl_selection
        model = env.model
        self.extra_queue = KeyQueue(cfg.moco_dim, cfg.ccl_k).to(model.queue.device)
        # The teacher exists from the start, with a fresh network's BatchNorm statistics, as the
        # authors build it; it takes part from the second task on (`teacher_active`). Its
        # parameters are set at that task start, so whatever it holds before does not matter.
        self.teacher: nn.Module = reset_bn_statistics(copy.deepcopy(model.encoder_q)).requires_grad_(False)
        self.teacher_active = False

    # ---------------------------------------------------------------- boundaries
    def on_task_start(self, task: int) -> None:
        if task == 0:
            return
        model = self.env.model
        model.copy_query_to_key()
        self.reset_teacher()
        self.teacher.eval()
        if task == 1 and self.config.ccl_extra_queue:
            self.extra_queue.fill_from(model.queue[:, :self.config.ccl_k])

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """teacher's parameters := the student's; its BatchNorm statistics stay its own (the
        authors' `reset_teacher`) unless `ccl_teacher_stats` is "student"."""
        student = self.env.model.encoder_q
        if self.config.ccl_teacher_stats == "student":
            self.teacher.load_state_dict(student.state_dict())
        else:
            copy_parameters(student, self.teacher)
        self.teacher_active = True

    def on_epoch_start(self, task: int, epoch: int) -> None:
        if self.teacher_active:
            train_mode = self.config.ccl_teacher_mode == "code" and epoch > 0
            self.teacher.train(train_mode)

    @torch.no_grad()
    def on_epoch_end(self, task: int, epoch: int) -> None:
        """teacher = m * teacher + (1 - m) * student, once per epoch (parameters only)."""
        if not self.teacher_active:
            return
        m = self.config.ccl_teacher_m
        t_params = list(self.teacher.parameters())
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, [p.detach() for p in self.env.model.encoder_q.parameters()],
                            alpha=1.0 - m)

    # ---------------------------------------------------------------- the step
    def extra_losses(self, task: int, batch: "Batch", out: StepOutputs) -> dict[str, torch.Tensor]:
        if task == 0:
            return {}
        cfg, losses = self.config, {}
        if cfg.ccl_extra_queue:
            losses["extra"] = cfg.ccl_extra_weight * info_nce_queue(out.q, out.k, self.extra_queue.queue,
                                                                    cfg.moco_t)
        old = batch.old_rows                      # on the host: no device sync
        if cfg.ccl_distill and self.teacher_active and old.any():
            # Forwards over the whole batch with per-slice BatchNorm, as each of the authors' GPUs
            # ran them on its share; old rows are selected inside distillation_kl. Like a GPU
            # whose share holds no replayed image, slice 0 leaves the running statistics alone
            # when it has none (the statistics follow slice 0 = rank 0).
            groups = self.env.bn_groups
            update = bool(old[:len(old) // groups].any())
            s_a = F.normalize(at_least_fp32(grouped_forward(
                self.env.model.encoder_q, batch.anchor, groups, update, self.env.encode_q))[0], dim=1)
            with torch.no_grad(), self._teacher_precision(batch.q.device):
                t_q, t_a = (grouped_forward(self.teacher, x, groups, update) for x in (batch.q, batch.anchor))
            losses["distill"] = cfg.ccl_distill_weight * distillation_kl(
                out.q, s_a, t_q, t_a, batch.is_old, cfg.ccl_t_student, cfg.ccl_t_teacher,
                cfg.ccl_distill_group)
            out.details.update(student_anchor=s_a.detach(), teacher_q=t_q, teacher_anchor=t_a)
        return losses

    def _teacher_precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        """fp32 for the teacher in eval mode, the run's precision otherwise. In eval mode the
        teacher normalizes with its running statistics, and at the second task those are a fresh
        network's (mean 0, variance 1), so its activations are not normalized at all and grow
        layer after layer with the trained weights; fp32 (the authors' precision) keeps the
        range and accuracy that bf16's 8-bit mantissa loses there. In train mode BatchNorm keeps
        activations small."""
        if self.teacher.training:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, enabled=False)

    def after_step(self, batch: "Batch", keys_all: torch.Tensor, is_old_all: torch.Tensor) -> None:
        if self.teacher_active and self.config.ccl_extra_queue:
            rows = np.flatnonzero(batch.old_rows_all)      # host flags: no device sync
            if len(rows):
                self.extra_queue.enqueue(keys_all[torch.from_numpy(rows).to(keys_all.device)])

    def teacher_encoder(self) -> nn.Module:
        """The teacher from the second task on; during the first task it would be the student."""
        return self.teacher if self.teacher_active else self.env.model.encoder_q

    def synced_modules(self) -> list[nn.Module]:
        return [self.teacher] if self.teacher_active else []

    # ---------------------------------------------------------------- replay
    def select_replay(self, task: int, task_ids: np.ndarray) -> np.ndarray:
        if self.selection == "random":
            return random_replay(self, task, task_ids)
        view_feats, anchor_feats = self._selection_features(task, task_ids)
        return select_min_variance(view_feats, anchor_feats, task_ids, self.env.classes_per_task,
                                   self.config.n_save, seed=self.env.seed + task)

    @torch.no_grad()
    def _selection_features(self, task: int, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalized head embeddings (query encoder, eval mode) of 6 MoCo v2 views + the anchor
        view of every image: (7, N, D) and the anchor's (N, D)."""
        encoder = self.env.model.encoder_q
        was_training = encoder.training
        encoder.eval()
        device = self.env.ctx.device
        generator = torch.Generator(device=device).manual_seed(self.env.seed * 1000 + task)
        views_out, anchors_out = [], []
        try:
            for views, anchor in self.env.views(ids, N_SELECTION_VIEWS, self.config.batch_size, generator):
                with self.env.autocast():
                    v = encoder(views.flatten(0, 1)).float().view(views.shape[0], views.shape[1], -1)
                    a = encoder(anchor).float()
                views_out.append(F.normalize(v, dim=2).cpu())
                anchors_out.append(F.normalize(a, dim=1).cpu())
        finally:
            encoder.train(was_training)
        anchor_feats = torch.cat(anchors_out)
        view_feats = torch.cat([torch.cat(views_out, dim=1), anchor_feats[None]], dim=0)
        return view_feats, anchor_feats

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The teacher is saved once active (before, it is a fresh network: nothing to keep)."""
        return {"extra_queue": self.extra_queue.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher_active else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.extra_queue.load_state_dict(state["extra_queue"])
        self.teacher_active = state["teacher"] is not None
        if self.teacher_active:
            self.teacher.load_state_dict(state["teacher"])
