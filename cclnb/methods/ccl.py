"""CCL (Lin, Wang, Lin 2021): MoCo v2 + replay of steady images + extra sample queue + distillation.

From the second task on, two terms join MoCo's loss (each weighted 0.1 by default):
1. the *extra sample queue*: InfoNCE of every query against a small queue (`ccl_k`) that starts as
   the first `ccl_k` keys of the main queue and afterwards receives only keys of replayed images;
2. *self-supervised distillation* on the replayed images of a batch: the student's similarities
   between its q-view and anchor-view embeddings are pulled towards a momentum teacher's.
The teacher (and MoCo's key encoder) is reset to the student at every task start and follows it by
EMA once per epoch. Replay keeps, per k-means cluster of the anchor embeddings, the `n_save`
images whose embedding varies least over 6 MoCo v2 views + the anchor view. No labels anywhere.

Two behaviours of the authors' code are explicit switches (defaults = the code):
`ccl_teacher_mode` "code" puts the teacher in train mode from a task's second epoch on (a side
effect of their `model.train()`), "eval" keeps it in eval mode; `ccl_distill_group` 32 computes the
distillation within 32-sample slices (what each of their 8 GPUs saw), 0 over the whole batch.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cclnb.errors import ConfigError
from cclnb.losses import distillation_kl, info_nce_queue
from cclnb.methods.base import Method, StepOutputs, TrainerEnv
from cclnb.methods.simple_replay import random_replay
from cclnb.models import MoCo
from cclnb.replay import select_min_variance

if TYPE_CHECKING:
    from cclnb.batches import Batch

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


class CCL(Method):
    name = "CCL"
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
        self.teacher: nn.Module | None = None

    # ---------------------------------------------------------------- boundaries
    def on_task_start(self, task: int) -> None:
        if task == 0:
            return
        model = self.env.model
        model.copy_query_to_key()
        self.teacher = copy.deepcopy(model.encoder_q).requires_grad_(False)
        if task == 1 and self.config.ccl_extra_queue:
            self.extra_queue.fill_from(model.queue[:, :self.config.ccl_k])

    def on_epoch_start(self, task: int, epoch: int) -> None:
        if self.teacher is not None:
            train_mode = self.config.ccl_teacher_mode == "code" and epoch > 0
            self.teacher.train(train_mode)

    @torch.no_grad()
    def on_epoch_end(self, task: int, epoch: int) -> None:
        """teacher = m * teacher + (1 - m) * student, once per epoch (parameters only)."""
        if self.teacher is None:
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
        if cfg.ccl_distill and self.teacher is not None:
            # Whole-batch forwards (as the authors', so BN sees the same batch); old rows are
            # selected inside distillation_kl.
            s_a = F.normalize(self.env.encode_q(batch.anchor).float(), dim=1)
            with torch.no_grad():
                t_q = self.teacher(batch.q)
                t_a = self.teacher(batch.anchor)
            losses["distill"] = cfg.ccl_distill_weight * distillation_kl(
                out.q, s_a, t_q, t_a, batch.is_old, cfg.ccl_t_student, cfg.ccl_t_teacher,
                cfg.ccl_distill_group)
        return losses

    def after_step(self, batch: "Batch", keys_all: torch.Tensor, is_old_all: torch.Tensor) -> None:
        if self.teacher is not None and self.config.ccl_extra_queue:
            self.extra_queue.enqueue(keys_all[is_old_all])

    def synced_modules(self) -> list[nn.Module]:
        return [] if self.teacher is None else [self.teacher]

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
        return {"extra_queue": self.extra_queue.state_dict(),
                "teacher": None if self.teacher is None else self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.extra_queue.load_state_dict(state["extra_queue"])
        if state["teacher"] is None:
            self.teacher = None
        else:
            self.teacher = copy.deepcopy(self.env.model.encoder_q).requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
