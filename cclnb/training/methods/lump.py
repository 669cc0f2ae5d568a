"""LUMP (Madaan et al., ICLR 2022, "Representational continuity for unsupervised continual
learning"): mixup of the current batch with images from a reservoir buffer.

A reservoir buffer of un-augmented images sees every training image once per visit (reservoir
sampling: after n images, each is held with probability size/n). Before each MoCo step, both
views of the batch are mixed with views of images drawn from the buffer,

    q' = lam * q + (1 - lam) * buffer view 1,      k' = lam * k + (1 - lam) * buffer view 2,

one lam ~ Beta(alpha, alpha) per batch (alpha 0.4) and the same buffer images for both views; then
the buffer takes the batch's images. MoCo's loss on the mixed pair is the whole method: no extra
term, no frozen model. No labels anywhere.

Faithful to the authors' code (divyam3897/UCL, `models/mixup.py` with `utils/buffer.py`): the
buffer is updated every step with the batch after the step's draw (Algorithm R: image number n + 1
replaces a uniformly chosen slot with probability size/(n + 1)); buffer images are drawn without
replacement, one batch of them per step; lam is one draw per batch, shared by both views; mixing
starts as soon as the buffer holds images, i.e. from the second step of the first task
(`lump_mix_first_task`, below).

Where cclnb differs, and why:
* UCL trains SimSiam or Barlow Twins, whose two branches are alike; here it is MoCo v2, and view q
  (the student's) and view k (the momentum key encoder's) are mixed alike, so the keys that enter
  MoCo's queue are mixed images too.
* The buffer keeps sample ids, not pixels; cclnb re-augments them (`env.views`) with MoCo v2's
  augmentation, two independent views per image. UCL mixes view 1 with a fresh *weaker*
  augmentation of the stored image (random resized crop 0.08-1 and flip, no colour jitter, the
  dataset's `get_transform`) and view 2 with the view 2 stored when the image entered the buffer
  (an augmentation fixed from then on).
* Its size: UCL keeps 256 images; cclnb matches the replay budget of SimpleReplay and CCL, the
  most images their replay ever holds, (tasks trained - 1) * n_save * C/n (`lump_buffer_size`
  None), so that the comparison spends the same memory. With fewer images in the buffer than the
  batch (UCL's code would fail there) the draw is with replacement.
* Randomness: UCL draws from NumPy's global generator; cclnb draws lam, the buffer rows and the
  reservoir's slots from a generator seeded by (seed, images seen so far), and the buffer views
  from a torch generator seeded alike, so a resumed run draws exactly what the interrupted one
  would have. Under DDP every rank keeps the same buffer (it takes the whole global batch), draws
  the same lam and rows, and augments its own share of the rows.
* `lump_mix_first_task` False mixes from the second task on only, as the paper's prose reads
  ("instances of the current task and instances from previous tasks").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cclnb.errors import CheckpointError, ConfigError
from cclnb.training import dist
from cclnb.training.methods.base import Method, TrainerEnv

if TYPE_CHECKING:
    from cclnb.data.batches import Batch

_STREAM = 0x4C554D50    # "LUMP": keeps this method's draws apart from other seeded streams


@dataclass
class LUMPOptions:
    """LUMP's options; defaults are UCL's configs, the buffer size matched to cclnb's replay."""

    lump_alpha: float = field(default=0.4, metadata={
        "help": "mixup's Beta(alpha, alpha) parameter (UCL's configs: 0.4)"})
    lump_buffer_size: int | None = field(default=None, metadata={
        "help": "images the reservoir buffer holds; None = the replay budget of SimpleReplay/CCL, "
                "(tasks trained - 1) * n_save * C/n (UCL: 256)"})
    lump_mix_first_task: bool = field(default=True, metadata={
        "help": "mix from the first task's second step, as UCL's code does; False = from the second task on"})

    def __post_init__(self) -> None:
        if not self.lump_alpha > 0:
            raise ConfigError(f"--lump-alpha must be > 0 (UCL: 0.4), got {self.lump_alpha}")
        if self.lump_buffer_size is not None and self.lump_buffer_size < 1:
            raise ConfigError(f"--lump-buffer-size must be >= 1, or left out for the replay budget of "
                              f"SimpleReplay/CCL, got {self.lump_buffer_size}")


# ----------------------------------------------------------------------------- pure functions
def reservoir_update(buffer: np.ndarray, n_seen: int, ids: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Reservoir sampling (Algorithm R) of a stream of ids into `buffer` (its length is the
    capacity): while the buffer is not full each id takes the next slot; afterwards id number
    n + 1 of the stream (n seen before it) replaces slot j for j ~ U{0..n} when j < capacity, and
    is dropped otherwise. Every id of the stream is then held with probability capacity / n_seen.
    Returns the new buffer (a copy) and the new count of ids seen."""
    buffer = buffer.copy()
    capacity = len(buffer)
    for sample in np.asarray(ids, dtype=np.int64):
        slot = n_seen if n_seen < capacity else int(rng.integers(0, n_seen + 1))
        if slot < capacity:
            buffer[slot] = sample
        n_seen += 1
    return buffer, n_seen


def mixup(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * x + (1 - lam) * y: mixup of two batches of (normalized) images."""
    return lam * x + (1.0 - lam) * y


def matched_buffer_size(n_trained_tasks: int, replay_budget: int) -> int:
    """The most ids SimpleReplay's and CCL's replay holds at once, during the last task: the budget
    of every earlier task (at least one task's, for a one-task run)."""
    return max(1, n_trained_tasks - 1) * replay_budget


# ----------------------------------------------------------------------------- the method
class LUMP(Method):
    name = "LUMP"
    Options = LUMPOptions
    # Two extra MoCo v2 views of `batch_size` buffer images per step, and the mixing; the
    # forwards are Finetuning's (measured: within noise of Finetuning's step at 32 px on the CPU).
    step_cost = 1.05

    def __init__(self, env: TrainerEnv) -> None:
        super().__init__(env)
        size = self.options.lump_buffer_size
        if size is None:
            n_tasks = self.config.train_tasks or self.config.n_tasks
            size = matched_buffer_size(n_tasks, self.replay_budget())
            if size < 1:
                raise ConfigError(f"LUMP's buffer matches the replay budget n_save * C/n, which is 0 with "
                                  f"--n-save {self.config.n_save}; raise --n-save or set --lump-buffer-size")
        self.buffer = np.full(size, -1, dtype=np.int64)
        self.n_seen = 0

    def before_step(self, task: int, batch: "Batch", generator: torch.Generator) -> "Batch":
        env = self.env
        ids_all = dist.all_gather_cat(batch.ids.to(env.ctx.device), env.ctx).cpu().numpy()
        rng = np.random.default_rng([env.seed, self.n_seen, _STREAM])
        filled = min(self.n_seen, len(self.buffer))
        mixed = batch
        if filled and (task > 0 or self.options.lump_mix_first_task):
            lam = float(rng.beta(self.options.lump_alpha, self.options.lump_alpha))
            rows = rng.choice(filled, size=len(ids_all), replace=filled < len(ids_all))
            b = len(batch.ids)
            mine = self.buffer[rows[env.ctx.rank * b:(env.ctx.rank + 1) * b]]
            seed = int(np.random.default_rng([env.seed, self.n_seen, _STREAM, 1 + env.ctx.rank]).integers(2**62))
            views, _ = next(iter(env.views(mine, 2, b, torch.Generator(device=env.ctx.device).manual_seed(seed))))
            mixed = dataclasses.replace(batch, q=mixup(batch.q, views[0].to(batch.q.dtype), lam),
                                        k=mixup(batch.k, views[1].to(batch.k.dtype), lam))
        self.buffer, self.n_seen = reservoir_update(self.buffer, self.n_seen, ids_all, rng)
        return mixed

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": torch.from_numpy(self.buffer.copy()), "n_seen": self.n_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffer = state["buffer"].numpy().astype(np.int64)
        if len(buffer) != len(self.buffer):
            raise CheckpointError(f"the checkpoint's LUMP buffer holds {len(buffer)} images but this run's "
                              f"holds {len(self.buffer)}; resume with the same --lump-buffer-size and --n-save")
        self.buffer, self.n_seen = buffer, int(state["n_seen"])
