"""The next batch built while the current step runs: a side CUDA stream and a generator per step.

Without it a step waits for its batch: `TensorFeeder` augments on the device's one stream, in
series with the model (the first H200 session measured 63,718 img/s for the augmentation alone
and 17,810 img/s for the step alone, 13,640 img/s in series). `PrefetchFeeder` queues batch i+1's
augmentation on a second stream before step i's kernels are queued, so the device runs both at
once; an event makes the step that uses a batch wait for exactly that batch, and the batch's
tensors are recorded on the consuming stream so the caching allocator cannot hand their memory to
the side stream while a step still reads it. Index and flag uploads go through pinned memory, so
building a batch never waits for the device either.

It changes the random stream, not the algorithm: every batch draws from its own generator
(`step_generator`: seeded by the epoch generator's seed and the step), because with batches built
ahead one epoch generator would be drawn in a different order than the steps consume it (the key
shuffle draws from it too). A mid-epoch resume rebuilds exactly the batches the interrupted run
would have built. GPU records with and without it are different streams (`prefetch` is part of the
config, so the study does not average them). On a CPU there is no second engine to overlap with:
the trainer refuses the option there, and this class builds the same batches without a stream
(which is what the CPU tests check).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from cclnb.data.batches import Batch, step_generator, steps_per_epoch
from cclnb.errors import ConfigError


class StepFeeder(Protocol):
    """A feeder that can build any one batch of an epoch on its own (`TensorFeeder`, `DecodeFeeder`)."""

    pinned: bool
    draw_device: torch.device   # where its random parameters are drawn (the generator's device)

    def batch_at(self, entries: tuple[np.ndarray, np.ndarray], order: np.ndarray, step: int,
                 batch_size: int, rank: int, world: int, generator: torch.Generator) -> Batch: ...

    def views(self, ids: np.ndarray, n_views: int, batch_size: int,
              generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def check_prefetch(loader: str, device: torch.device) -> None:
    """The option's preconditions, as a clear error: a CUDA device and a loader that builds batches
    on it (the worker loader already builds them ahead, in its worker processes)."""
    if loader not in ("tensor", "decode"):
        raise ConfigError(f"--prefetch builds batches on the device, which --loader {loader} does not (its "
                          f"DataLoader workers already prepare batches ahead); use --loader tensor or "
                          f"--loader decode, or drop --prefetch")
    if device.type != "cuda":
        raise ConfigError("--prefetch overlaps the next batch's augmentation with the step on a second "
                          "CUDA stream; on a CPU there is nothing to overlap with (and it would change the "
                          "random stream): drop --prefetch, or train on a GPU")


class PrefetchFeeder:
    """`feeder`'s batches, each built one step ahead on a side stream (on CUDA), every batch
    from its own step's generator. `channels_last` converts the views there too, so that the
    step's own conversion finds them converted."""

    def __init__(self, feeder: StepFeeder, device: torch.device, channels_last: bool = False) -> None:
        self.feeder, self.device = feeder, device
        self.channels_last = channels_last and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        feeder.pinned = device.type == "cuda"

    def views(self, ids: np.ndarray, n_views: int, batch_size: int,
              generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Replay selection's views: the wrapped feeder's, unchanged (not a training batch)."""
        return self.feeder.views(ids, n_views, batch_size, generator)

    def _build(self, entries: tuple[np.ndarray, np.ndarray], order: np.ndarray, step: int, batch_size: int,
               rank: int, world: int, generator: torch.Generator) -> Batch:
        batch = self.feeder.batch_at(entries, order, step, batch_size, rank, world,
                                     step_generator(generator, step, self.feeder.draw_device))
        if self.channels_last:
            batch.q, batch.k, batch.anchor = (view.contiguous(memory_format=torch.channels_last)
                                              for view in (batch.q, batch.k, batch.anchor))
        return batch

    def batches(self, entries: tuple[np.ndarray, np.ndarray], order: np.ndarray, batch_size: int,
                rank: int, world: int, start_step: int, generator: torch.Generator) -> Iterator[Batch]:
        """The epoch's batches from `start_step` on; `generator` (the epoch's) only seeds them."""
        n_steps = steps_per_epoch(len(entries[0]), batch_size)
        build = lambda step: self._build(entries, order, step, batch_size, rank, world, generator)  # noqa: E731
        if self.stream is None:
            for step in range(start_step, n_steps):
                yield build(step)
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)        # the resident images (and anything else) uploaded first
        pending = self._ahead(build, start_step) if start_step < n_steps else None
        for step in range(start_step, n_steps):
            batch, ready = pending
            main.wait_event(ready)
            for tensor in (batch.q, batch.k, batch.anchor, batch.is_old):
                tensor.record_stream(main)
            # batch step+1 is queued on the side stream before this step's kernels on the main one
            pending = self._ahead(build, step + 1) if step + 1 < n_steps else None
            yield batch

    def _ahead(self, build, step: int) -> tuple[Batch, torch.cuda.Event]:
        with torch.cuda.stream(self.stream):
            batch = build(step)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return batch, ready
