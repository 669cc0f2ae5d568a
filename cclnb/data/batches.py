"""Feeding the trainer: which sample ids an epoch visits, in which order, as which views.

An epoch's *entries* are the current task's ids followed by the replayed ids (duplicates kept:
SimpleReplay draws with replacement and the authors' list-based dataset visits a duplicate
twice). The order is a permutation seeded by (seed, task, epoch), cut into global batches with
`drop_last`; under DDP rank r takes the r-th slice of every global batch (the global batch is
split across ranks, as in the authors' code). Because the order depends only on those numbers, a
resumed run visits exactly the batches the interrupted one would have.

Two feeders produce the views of a batch (q, k, anchor):
* `TensorFeeder` (images <= 64 px): the uint8 images live on the training device; a batch is an
  index, augmented there by `BatchMoCoV2Augment`. No worker processes, no start-up stall.
* `WorkerFeeder` (large images): the authors' path, torchvision transforms in DataLoader workers.

Two more wrap or replace them on request: `cclnb.data.prefetch.PrefetchFeeder` (the next batch
augmented on a side CUDA stream while the step runs) and `cclnb.data.jpeg.DecodeFeeder` (JPEG
files decoded on the training device per batch). Both draw each batch's random parameters from a
generator of its own step (`step_generator`), so building batches ahead of the step cannot
change which numbers a step gets, and a resumed epoch rebuilds the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cclnb.data.augment import BatchMoCoV2Augment, anchor_transform, anchor_uint8, moco_v2_transform
from cclnb.errors import ConfigError


@dataclass
class Batch:
    """One rank's share of a global batch, on the training device.

    Which rows are replayed is also kept on the host (`old_rows`, `old_rows_all`): the feeders know
    it before the batch is built, so the step can skip CCL's distillation forwards on a batch
    without replayed rows and pick the extra queue's keys without waiting for the device. A batch
    built by hand may leave them out; they are then read from `is_old` (one device sync).
    """

    q: torch.Tensor          # (b, 3, S, S) float, MoCo v2 view 1
    k: torch.Tensor          # (b, 3, S, S) float, MoCo v2 view 2 (independent draw)
    anchor: torch.Tensor     # (b, 3, S', S') float, plain view (CCL's distillation anchor)
    is_old: torch.Tensor     # (b,) bool, True for replayed samples
    ids: torch.Tensor        # (b,) int64 sample ids (kept for tests and audits)
    old_host: np.ndarray | None = None       # (b,) bool: is_old on the host
    old_all_host: np.ndarray | None = None   # (world*b,) bool: every rank's is_old, in rank order

    @property
    def old_rows(self) -> np.ndarray:
        """This rank's replayed-row flags on the host."""
        if self.old_host is None:
            self.old_host = self.is_old.detach().cpu().numpy().astype(bool)
        return self.old_host

    @property
    def old_rows_all(self) -> np.ndarray:
        """Every rank's replayed-row flags (rank order) on the host; this rank's alone when the
        feeder did not give them (one process)."""
        return self.old_rows if self.old_all_host is None else self.old_all_host


def epoch_entries(task_ids: np.ndarray, replay_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, is_old) of an epoch: the task's images, then every replayed image flagged old."""
    ids = np.concatenate([np.asarray(task_ids, np.int64), np.asarray(replay_ids, np.int64)])
    is_old = np.zeros(len(ids), dtype=bool)
    is_old[len(task_ids):] = True
    return ids, is_old


def steps_per_epoch(n_entries: int, batch_size: int) -> int:
    return n_entries // batch_size


def epoch_order(n_entries: int, seed: int, task: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of entry positions; identical on every rank and after a resume."""
    return np.random.default_rng([seed, task, epoch]).permutation(n_entries)


def step_generator(generator: torch.Generator, step: int, device: torch.device | str | None = None
                   ) -> torch.Generator:
    """A generator of batch `step` alone, on `device` (default: `generator`'s), seeded by
    (`generator.initial_seed()`, step). The epoch's generator is seeded by (seed, task, epoch,
    rank) and its initial seed survives `set_state`, so a batch's draws depend only on those
    numbers and the step: not on how many batches were built before it, nor on when."""
    seed = int(np.random.default_rng([generator.initial_seed(), step]).integers(2**62))
    return torch.Generator(device=generator.device if device is None else device).manual_seed(seed)


def rank_positions(order: np.ndarray, step: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Entry positions of `rank`'s slice of global batch `step` (batch_size is the global size)."""
    local = batch_size // world
    start = step * batch_size + rank * local
    return order[start:start + local]


def old_flags(is_old: np.ndarray, order: np.ndarray, step: int, batch_size: int, rank: int,
              world: int) -> tuple[np.ndarray, np.ndarray]:
    """(this rank's, every rank's) replayed flags of global batch `step`, on the host."""
    global_flags = is_old[order[step * batch_size:(step + 1) * batch_size]]
    local = batch_size // world
    return global_flags[rank * local:(rank + 1) * local], global_flags


def check_batch(n_entries: int, batch_size: int, world: int, task: int) -> None:
    """An epoch must hold at least one full global batch and the batch must split over ranks."""
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} is the global batch and must be divisible by "
                          f"the {world} processes; choose a multiple of {world}")
    if n_entries < batch_size:
        raise ConfigError(f"task {task} has {n_entries} training images, fewer than one batch of "
                          f"{batch_size} (batches are dropped when incomplete); lower --batch-size "
                          f"or use more images per class")


class TensorFeeder:
    """Batches indexed from a uint8 image tensor resident on the training device."""

    def __init__(self, images_uint8: np.ndarray, ids: np.ndarray, image_size: int, blur: bool,
                 small_images: bool, device: torch.device) -> None:
        """`images_uint8[i]` is the image of sample `ids[i]`: only the images the run trains on
        move to the device, and `row` maps a sample id to its row."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(images_uint8) != len(ids):
            raise ValueError(f"{len(images_uint8)} images for {len(ids)} ids")
        self.images = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device)
        self.row = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
        self.row[ids] = np.arange(len(ids))
        self.device = self.draw_device = device     # its random parameters are drawn on the device
        self.augment = BatchMoCoV2Augment(image_size, blur)
        self.image_size, self.small_images = image_size, small_images
        # Host arrays go up through pinned memory without waiting for the device when set (the
        # prefetching wrapper sets it on CUDA): the same values, no host-device sync per batch.
        self.pinned = False

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.pinned:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _rows(self, ids: np.ndarray) -> torch.Tensor:
        return self._upload(self.row[ids])

    def batch_at(self, entries: tuple[np.ndarray, np.ndarray], order: np.ndarray, step: int,
                 batch_size: int, rank: int, world: int, generator: torch.Generator) -> Batch:
        """Batch `step` of the epoch (this rank's share), augmented with `generator`'s draws."""
        ids, is_old = entries
        pos = rank_positions(order, step, batch_size, rank, world)
        images = self.images[self._rows(ids[pos])]
        old_host, old_all = old_flags(is_old, order, step, batch_size, rank, world)
        return Batch(q=self.augment(images, generator), k=self.augment(images, generator),
                     anchor=anchor_uint8(images, self.image_size, self.small_images),
                     is_old=self._upload(old_host),
                     ids=torch.from_numpy(ids[pos]), old_host=old_host, old_all_host=old_all)

    def batches(self, entries: tuple[np.ndarray, np.ndarray], order: np.ndarray, batch_size: int,
                rank: int, world: int, start_step: int, generator: torch.Generator) -> Iterator[Batch]:
        """The epoch's batches from `start_step` on, every draw from the one `generator` in step
        order (a mid-epoch checkpoint saves its state between steps)."""
        for step in range(start_step, steps_per_epoch(len(entries[0]), batch_size)):
            yield self.batch_at(entries, order, step, batch_size, rank, world, generator)

    def views(self, ids: np.ndarray, n_views: int, batch_size: int,
              generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(views (V, b, 3, S, S), anchor (b, ...)) chunks over `ids`, for replay selection."""
        for start in range(0, len(ids), batch_size):
            images = self.images[self._rows(ids[start:start + batch_size])]
            views = torch.stack([self.augment(images, generator) for _ in range(n_views)])
            yield views, anchor_uint8(images, self.image_size, self.small_images)


class _ViewDataset(torch.utils.data.Dataset):
    """Entries of an epoch as (q, k, anchor, is_old, id) through the CPU transforms."""

    def __init__(self, dataset, entries: tuple[np.ndarray, np.ndarray], image_size: int, blur: bool,
                 small_images: bool, n_views: int = 2) -> None:
        self.dataset, (self.ids, self.is_old) = dataset, entries
        self.moco = moco_v2_transform(image_size, blur)
        self.anchor = anchor_transform(image_size, small_images)
        self.n_views = n_views

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, pos: int):
        image = self.dataset.load_pil(int(self.ids[pos]))
        views = torch.stack([self.moco(image) for _ in range(self.n_views)])
        return views, self.anchor(image), bool(self.is_old[pos]), int(self.ids[pos])


class _OrderSampler(torch.utils.data.Sampler):
    """Yields this rank's entry positions of the current epoch (set by `set_order`); plays the
    role of DistributedSampler while sharing the tensor feeder's order exactly."""

    def __init__(self) -> None:
        self.positions: np.ndarray = np.zeros(0, dtype=np.int64)

    def set_positions(self, positions: np.ndarray) -> None:
        self.positions = positions

    def __iter__(self):
        return iter(self.positions.tolist())

    def __len__(self) -> int:
        return len(self.positions)


class WorkerFeeder:
    """The authors' data path: PIL images, torchvision transforms, DataLoader worker processes.

    A loader is built once per task (the entries change between tasks) with persistent workers,
    so workers start once per task rather than once per epoch."""

    def __init__(self, dataset, image_size: int, blur: bool, small_images: bool, workers: int,
                 device: torch.device) -> None:
        self.dataset, self.image_size, self.blur = dataset, image_size, blur
        self.small_images, self.workers, self.device = small_images, workers, device
        self._key: tuple | None = None
        self._loader = None
        self._sampler = _OrderSampler()

    def _loader_for(self, entries: tuple[np.ndarray, np.ndarray], local: int, n_views: int):
        key = (id(entries[0]), local, n_views)
        if key != self._key:
            data = _ViewDataset(self.dataset, entries, self.image_size, self.blur, self.small_images, n_views)
            self._sampler = _OrderSampler()
            self._loader = torch.utils.data.DataLoader(
                data, batch_size=local, sampler=self._sampler, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", drop_last=False,
                persistent_workers=self.workers > 0)
            self._key = key
        return self._loader

    def batches(self, entries: tuple[np.ndarray, np.ndarray], order: np.ndarray, batch_size: int,
                rank: int, world: int, start_step: int, generator: torch.Generator) -> Iterator[Batch]:
        local = batch_size // world
        n_steps = steps_per_epoch(len(entries[0]), batch_size)
        loader = self._loader_for(entries, local, 2)
        self._sampler.set_positions(np.concatenate(
            [rank_positions(order, s, batch_size, rank, world) for s in range(start_step, n_steps)]
            or [np.zeros(0, dtype=np.int64)]))
        for step, (views, anchor, is_old, ids) in enumerate(loader, start=start_step):
            views = views.to(self.device, non_blocking=True)
            old_host, old_all = old_flags(entries[1], order, step, batch_size, rank, world)
            yield Batch(q=views[:, 0], k=views[:, 1], anchor=anchor.to(self.device, non_blocking=True),
                        is_old=is_old.to(self.device), ids=ids, old_host=old_host, old_all_host=old_all)

    def views(self, ids: np.ndarray, n_views: int, batch_size: int,
              generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        entries = epoch_entries(ids, np.zeros(0, dtype=np.int64))
        data = _ViewDataset(self.dataset, entries, self.image_size, self.blur, self.small_images, n_views)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False,
                                             num_workers=self.workers)
        for views, anchor, _, _ in loader:
            yield views.to(self.device).transpose(0, 1), anchor.to(self.device)
