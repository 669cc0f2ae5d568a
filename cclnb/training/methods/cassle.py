"""CaSSLe (Fini et al., CVPR 2022, "Self-Supervised Models are Continual Learners") for MoCo v2.

From the second task on, the encoder learns to *predict* what the previous task's encoder made of
the same images: a frozen copy of the encoder (backbone + projection head) is taken at every task
start after the first, a small trainable predictor maps the student's projection into the frozen
copy's space, and a contrastive loss (`losses.contrastive_distillation`, temperature 0.2, weight
1) pulls each prediction towards the frozen projection of the same view of the same image and away
from the frozen projections of the batch's other views. The frozen copy only looks: it is never
trained, and CaSSLe keeps no replay buffer and no labels.

Faithful to the authors' code (DonkeyShot21/cassle: `cassle/distillers/base.py`,
`cassle/distillers/contrastive.py`, `cassle/losses/simclr.py`, MoCo V2+ with `--distiller
contrastive`), point by point:
* the predictor is Linear(dim, 2048)-BatchNorm1d-ReLU-Linear(2048, dim) on the student's
  *L2-normalized* projection (their MoCo V2+ hands the distiller its normalized `q`), applied to
  each view in its own call (BatchNorm statistics per view), trained from the second task on
  (their first task runs without the distiller) and kept from task to task (their next task loads
  it from the previous checkpoint);
* the frozen copy runs in train mode, as theirs does (a submodule of the Lightning module follows
  its `train()`), so its BatchNorm normalizes with the batch's statistics; cclnb leaves its
  running statistics alone (they are never read), so the copy stays bit-identical all task long;
* the loss is symmetric in the reference's sense: rows and columns of the (2b, 2b) similarity
  matrix between predictions and frozen projections, averaged, with this process's rows as the
  negatives (the reference gathers nothing across GPUs).

Where cclnb differs, and why:
* cclnb's MoCo v2 step is the authors' (CCL's) asymmetric one: the student encodes only view q
  and the key encoder view k. CaSSLe's reference distils both views, so `extra_losses` runs the
  student on view k as well, with the step's BatchNorm grouping (`grouped_forward` with
  `env.bn_groups`, as every train-mode forward), updating its running statistics as the
  reference's second student forward does. That second forward feeds only the distillation; the
  MoCo loss stays the asymmetric one.
* BatchNorm follows cclnb's protocol: the student's and the frozen copy's forwards normalize per
  `--bn-groups` slice (the reference synchronized BatchNorm over its 2 GPUs), and the predictor's
  BatchNorm1d over this process's rows (in one process, the whole batch, as SyncBatchNorm did).
* The optimizer is cclnb's one SGD over encoder and predictor, kept across tasks; the reference
  builds a fresh optimizer (and LR warm-up) per task, as its whole pipeline does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cclnb.errors import ConfigError
from cclnb.training.losses import at_least_fp32, contrastive_distillation
from cclnb.training.methods.base import Method, StepOutputs, TrainerEnv
from cclnb.training.models import grouped_forward

if TYPE_CHECKING:
    from cclnb.data.batches import Batch


@dataclass
class CaSSLeOptions:
    """CaSSLe's options; defaults are the reference's `--distill_*` flags."""

    cassle_pred_hidden: int = field(default=2048, metadata={
        "help": "hidden width of the distillation predictor (the reference's --distill_proj_hidden_dim)"})
    cassle_t: float = field(default=0.2, metadata={
        "help": "temperature of the contrastive distillation (--distill_temperature)"})
    cassle_weight: float = field(default=1.0, metadata={
        "help": "weight of the distillation term in the loss (--distill_lamb)"})

    def __post_init__(self) -> None:
        if self.cassle_pred_hidden < 1:
            raise ConfigError(f"--cassle-pred-hidden must be >= 1 (the reference: 2048), got "
                              f"{self.cassle_pred_hidden}")
        if not self.cassle_t > 0:
            raise ConfigError(f"--cassle-t must be > 0 (the reference: 0.2), got {self.cassle_t}")
        if not self.cassle_weight >= 0:
            raise ConfigError(f"--cassle-weight must be >= 0 (the reference: 1; 0 is plain "
                              f"Finetuning at twice the cost), got {self.cassle_weight}")


def predictor(dim: int, hidden: int) -> nn.Sequential:
    """CaSSLe's distillation predictor: Linear-BatchNorm1d-ReLU-Linear, dim -> dim."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


class CaSSLe(Method):
    name = "CaSSLe"
    Options = CaSSLeOptions
    loss_terms = ("cassle",)
    # From the second task on a step runs the student twice (forward + backward) and the frozen
    # copy twice (forward): 1.8x Finetuning's step on the quarter-width CPU network (bf16, batch 64).
    step_cost = 1.8

    def __init__(self, env: TrainerEnv) -> None:
        super().__init__(env)
        device = env.model.queue.device
        self.predictor = predictor(self.config.moco_dim, self.options.cassle_pred_hidden).to(device)
        self.frozen: nn.Module | None = None     # the encoder as the previous task left it

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"predictor": self.predictor}

    # ---------------------------------------------------------------- boundaries
    def on_task_start(self, task: int) -> None:
        if task > 0:
            self.frozen = self._frozen_copy()

    def _frozen_copy(self) -> nn.Module:
        """A train-mode, gradient-free copy of the student's encoder (backbone + head)."""
        return copy.deepcopy(self.env.model.encoder_q).requires_grad_(False).train()

    # ---------------------------------------------------------------- the step
    def extra_losses(self, task: int, batch: "Batch", out: StepOutputs) -> dict[str, torch.Tensor]:
        if self.frozen is None:
            return {}
        env, groups = self.env, self.env.bn_groups
        z_k = F.normalize(at_least_fp32(grouped_forward(env.model.encoder_q, batch.k, groups, True,
                                                        env.encode_q))[0], dim=1)
        with torch.no_grad():
            frozen_q, frozen_k = (grouped_forward(self.frozen, x, groups, False) for x in (batch.q, batch.k))
        p_q, p_k = self.predictor(out.q), self.predictor(z_k)
        loss = contrastive_distillation(p_q, p_k, frozen_q, frozen_k, self.options.cassle_t)
        out.details.update(cassle_p_q=p_q.detach(), cassle_frozen_q=frozen_q)
        return {"cassle": self.options.cassle_weight * loss}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The frozen copy once taken (a mid-task resume cannot rebuild it from the student)."""
        return {"frozen": self.frozen.state_dict() if self.frozen is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = None
        if state["frozen"] is not None:
            self.frozen = self._frozen_copy()
            self.frozen.load_state_dict(state["frozen"])
