"""Frozen-backbone feature extraction, the shared first step of the kNN and the fast probe.

Features are computed once per evaluation with no augmentation: the backbone runs in eval mode
(BatchNorm uses its running statistics) under `torch.no_grad`, and its previous train/eval mode
is restored afterwards, because the trainer calls this in the middle of a run.

Under torchrun every rank extracts a share and all get every feature (`ctx`): the images are cut
into the same batches as one process cuts them, rank r takes batches r, r + W, r + 2W, ... and the
shares are gathered back into the images' order. A batch is the same batch on whichever rank runs
it, so the features are those of one process, to the bit where the device computes a batch the
same way (tested on the CPU: tests/test_dist.py). Why: the per-task evaluation of an 8-GPU training
job otherwise runs on one GPU while seven wait (docs/performance.md, the cost table).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cclnb.errors import ConfigError, DataError
from cclnb.training import dist
from cclnb.training.precision import autocast

@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Run `module` in eval mode without gradients, then give it back in the mode it had."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def as_uint8_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Check that `images` is a (N, H, W, 3) uint8 array or tensor and return it as a tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.ndim != 4 \
            or tensor.shape[-1] != 3:
        shape = tuple(getattr(images, "shape", ()))
        dtype = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"images must be a (N, H, W, 3) uint8 array (as `cclnb.data.load_uint8` "
                        f"returns), got shape {shape} dtype {dtype}; decode the dataset with load_uint8 "
                        f"or pass the ImageDataset itself")
    return tensor


def shard_rows(total: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """The rows of batches rank, rank + world, ... of `total` rows cut in `batch_size` batches."""
    starts = range(rank * batch_size, total, world * batch_size)
    return np.concatenate([np.arange(s, min(s + batch_size, total)) for s in starts] or [np.zeros(0, np.int64)])


def _batches_uint8(images: torch.Tensor, device: torch.device, batch_size: int,
                   image_size: int | None, rows: np.ndarray) -> Iterator[torch.Tensor]:
    """Normalized eval views of the batches of `rows` (consecutive slices), moved to the device
    one batch at a time."""
    from cclnb.data.augment import anchor_uint8

    size = image_size or images.shape[1]
    for start in range(0, len(rows), batch_size):
        first = int(rows[start])
        chunk = images[first:first + min(batch_size, len(rows) - start)].to(device, non_blocking=True)
        yield anchor_uint8(chunk, size, small_images=size <= 64)


def _batches_dataset(dataset, device: torch.device, batch_size: int, image_size: int | None,
                     workers: int, rows: np.ndarray) -> Iterator[torch.Tensor]:
    """Eval-transformed batches of an ImageDataset's `rows` (decoded from files through a DataLoader)."""
    from cclnb.data.augment import eval_transform

    size = image_size or dataset.image_size or 224
    transform = eval_transform(size, small_images=size <= 64)
    images = _TransformedDataset(dataset, transform)
    if len(rows) < len(dataset):
        images = torch.utils.data.Subset(images, rows.tolist())
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size,
                                         shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    for batch in loader:
        yield batch.to(device, non_blocking=True)


class _TransformedDataset(torch.utils.data.Dataset):
    """Images only (labels are the caller's business), through a PIL transform."""

    def __init__(self, dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.dataset.load_pil(i))


def _eval_batches(images, device: torch.device, batch_size: int, image_size: int | None,
                  workers: int, shard: tuple[int, int] = (0, 1)) -> tuple[int, np.ndarray, Iterator[torch.Tensor]]:
    """(number of images, the rows of this `shard` (rank, world), their normalized eval views batch
    by batch) for an array or a dataset."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    total = len(images) if hasattr(images, "load_pil") else as_uint8_tensor(images).shape[0]
    if total == 0:
        raise DataError("no images to extract features from; check the split and --subset-per-class")
    rows = shard_rows(total, batch_size, *shard)
    if hasattr(images, "load_pil"):
        batches = _batches_dataset(images, device, batch_size, image_size, workers, rows)
    else:
        batches = _batches_uint8(as_uint8_tensor(images), device, batch_size, image_size, rows)
    return total, rows, batches


def extract_features(backbone: nn.Module, images, device: str | torch.device, batch_size: int = 512,
                     image_size: int | None = None, precision: str = "fp32", workers: int = 0,
                     progress: bool = True, desc: str = "features",
                     ctx: dist.DistContext | None = None) -> torch.Tensor:
    """Backbone features of every image, in order: a float32 (N, D) tensor on `device`.

    `images` is either a (N, H, W, 3) uint8 array/tensor (the fast path: slices go to the device
    and are normalized there, resized to `image_size` when given) or an `ImageDataset` (decoded
    with the eval transform through a DataLoader with `workers` processes). No L2 normalization:
    the kNN normalizes, the probe standardizes. With a distributed `ctx` every rank must call
    this with the same arguments; each extracts its share and all return every feature (see the
    module docstring).
    """
    device = torch.device(device)
    shard = (ctx.rank, ctx.world_size) if ctx is not None and ctx.distributed else (0, 1)
    total, rows, batches = _eval_batches(images, device, batch_size, image_size, workers, shard)
    chunks = []
    with frozen(backbone), autocast(device, precision), \
            tqdm(total=len(rows), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in batches:
            chunks.append(backbone(batch).float())
            bar.update(batch.shape[0])
    if shard[1] == 1:
        return torch.cat(chunks)
    return _gather_shards(chunks, total, batch_size, ctx, device)


def _gather_shards(chunks: list[torch.Tensor], total: int, batch_size: int, ctx: dist.DistContext,
                   device: torch.device) -> torch.Tensor:
    """Every rank's features (`chunks`: this rank's batches) in the images' order, on every rank.
    The shares are padded to the largest for one all-gather; a rank without a batch
    learns the feature width from the others."""
    width = torch.tensor([chunks[0].shape[1] if chunks else 0], device=device)
    torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
    rows = [shard_rows(total, batch_size, r, ctx.world_size) for r in range(ctx.world_size)]
    most = max(len(r) for r in rows)
    padded = torch.zeros(most, int(width.item()), device=device)
    mine = torch.cat(chunks) if chunks else padded[:0]
    padded[:len(mine)] = mine
    gathered = dist.all_gather_cat(padded, ctx)
    keep = torch.cat([torch.arange(len(r)) + rank * most for rank, r in enumerate(rows)]).to(device)
    features = torch.empty(total, padded.shape[1], device=device)
    features[torch.from_numpy(np.concatenate(rows)).to(device)] = gathered[keep]
    return features


def calibrate_batchnorm(backbone: nn.Module, images, device: str | torch.device, batch_size: int = 512,
                        image_size: int | None = None, precision: str = "fp32", workers: int = 0,
                        progress: bool = True) -> nn.Module:
    """Replace every BatchNorm's running statistics by their exact average over `images`.

    Why: in eval mode a freshly built network's BatchNorm layers use mean 0 and variance 1, i.e.
    they do nothing, while every trained encoder normalizes with statistics of the data. The
    untrained baseline with calibrated statistics differs from a trained encoder only in what
    training taught its weights (on the demo digits the plain untrained encoder scores 81% kNN,
    the same weights with data statistics 63%). The weights are not touched; the statistics are a
    cumulative average (momentum None) over the eval views of `images`, read as `extract_features`
    reads them. Returns `backbone`, in the train/eval mode it had.
    """
    device = torch.device(device)
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    total, _, batches = _eval_batches(images, device, batch_size, image_size, workers)
    was_training = backbone.training
    backbone.train()
    try:
        with torch.no_grad(), autocast(device, precision), \
                tqdm(total=total, desc="BatchNorm statistics", unit="img", disable=not progress, leave=False) as bar:
            for batch in batches:
                if batch.shape[0] > 1:   # train-mode BatchNorm needs two values per channel
                    backbone(batch)
                bar.update(batch.shape[0])
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        backbone.train(was_training)
    return backbone
