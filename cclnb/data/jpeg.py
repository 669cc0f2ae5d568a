"""JPEG files decoded on the training device, every view cropped from the full-resolution image.

The authors' 224 px path decodes and augments every image with PIL in DataLoader workers: on one
H200, about 1,000 img/s for ResNet-50 against a step that could take 2,270 (`../shared/anchors.md`),
and minutes before the first batch. `DecodeFeeder` (`--loader decode`) reads a batch's encoded
files on the host (one thread, the next batch's files while this batch trains), decodes them all
in one `torchvision.io.decode_jpeg(..., device=...)` call (nvJPEG on CUDA, libjpeg on the CPU:
the same code path, so the CPU tests exercise it), and builds MoCo v2's views per image from
the decoded full-resolution pixels:

- each view's RandomResizedCrop box is drawn from *that image's own* height and width
  (`sample_crop_boxes` with per-sample sizes: the ten tries, rounding and fallback of
  torchvision), then cut and resized to S x S with torchvision's tensor resize (bilinear,
  antialiased when shrinking, as PIL's resize is), one image at a time since sizes differ;
- the colour steps, grayscale, blur and normalization then run batched, the same code as the
  32 px path (`BatchMoCoV2Augment.colour`); the flip is a mirror of the finished crop;
- the anchor view is the authors' geometry (resize, centre crop) on the tensor, per image.

Random parameters are drawn on the host, from a CPU generator of the step's own
(`step_generator`): no device sync to read the crop boxes, the same crops on a CPU and a GPU,
and a resumed epoch rebuilds the same batches. Its random stream is its own, not the worker
path's (PIL's uint8 rounding and per-worker seeds differ anyway).

nvJPEG's hardware decoder can write its output before work already queued on the allocating
stream has run (pytorch/vision#9606), so decoding runs on a stream of its own and its outputs are
recorded on the consuming stream: the caching allocator then never gives a decoder a block that
queued kernels still read. Memory: one batch's decoded images and float crops (for ImageNet-Sub,
~500 x 375 px JPEGs, batch 256: ~145 MB of pixels and ~0.5 GB of views), nothing resident.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from cclnb.data.augment import BatchMoCoV2Augment, MoCoV2Params, anchor_geometry, normalize_float
from cclnb.data.batches import Batch, old_flags, rank_positions, step_generator, steps_per_epoch
from cclnb.errors import DataError

JPEG_MAGIC = b"\xff\xd8"


def _as_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_images(encoded: list[bytes], device: torch.device, where: Callable[[int], str],
                  stream: torch.cuda.Stream | None = None) -> list[Tensor]:
    """(3, H, W) uint8 RGB tensors on `device`, one per encoded file: the JPEGs in one batched
    `decode_jpeg` on the device (on `stream` when given, outputs recorded on the current one),
    anything else (PNG, ...) decoded on the host and moved. A file that cannot be decoded raises a
    DataError naming it (`where(i)`)."""
    tensors = [_as_tensor(data) for data in encoded]
    jpeg = [i for i, data in enumerate(encoded) if data[:2] == JPEG_MAGIC]
    out: list[Tensor | None] = [None] * len(encoded)
    try:
        if jpeg:
            consumer = torch.cuda.current_stream(device) if stream is not None else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                decoded = decode_jpeg([tensors[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpeg, decoded):
                if consumer is not None:
                    image.record_stream(consumer)
                out[i] = image
            if consumer is not None:
                consumer.wait_stream(stream)
        for i in sorted(set(range(len(encoded))) - set(jpeg)):
            out[i] = decode_image(tensors[i], mode=ImageReadMode.RGB).to(device)
    except RuntimeError as error:
        bad = next((i for i, t in enumerate(tensors) if not _decodes(t)), None)
        name = where(bad) if bad is not None else "in this batch"
        raise DataError(f"cannot decode image {name}: {error}. The file is corrupt or not an image; "
                        f"replace it or delete it from the dataset (or train with --loader workers, "
                        f"which names it too)") from error
    return out  # type: ignore[return-value]


def _decodes(data: Tensor) -> bool:
    try:
        decode_image(data, mode=ImageReadMode.RGB)
        return True
    except RuntimeError:
        return False


def crop_views(images: list[Tensor], boxes: list[list[int]], size: int) -> Tensor:
    """(B, 3, size, size) floats in [0, 1]: image i cut to its box (top, left, h, w) and resized
    by torchvision's tensor resize (bilinear, antialiased), one image at a time (sizes differ)."""
    return torch.stack([TF.resize(image[:, top:top + h, left:left + w].float(), [size, size], antialias=True)
                        for image, (top, left, h, w) in zip(images, boxes)]).div_(255.0)


def check_decodable(dataset) -> None:
    """`--loader decode` reads encoded files; a dataset held as decoded pixels has none (checked
    before a run writes its directory, and again by the feeder for direct users of the loop)."""
    if not callable(getattr(dataset, "read_bytes", None)):
        raise DataError(f"--loader decode decodes image files on the device, but {dataset.name} "
                        f"({dataset.kind}) holds decoded pixels, not files; use --loader tensor "
                        f"(or auto) for it")


class DecodeFeeder:
    """Batches of a JPEG dataset decoded on the training device (see the module docstring)."""

    def __init__(self, dataset, image_size: int, blur: bool, small_images: bool, device: torch.device) -> None:
        check_decodable(dataset)
        self.dataset, self.device = dataset, device
        self.draw_device = torch.device("cpu")       # parameters drawn on the host: no sync to read boxes
        self.pinned = device.type == "cuda"
        self.augment = BatchMoCoV2Augment(image_size, blur)
        self.image_size = image_size
        self.anchor_geometry = T.Compose(anchor_geometry(image_size, small_images))
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="cclnb-read")
        self._ahead: tuple[tuple, Future] | None = None     # (key, the files of the next batch)

    # ------------------------------------------------------------------ host side
    def _read(self, ids: np.ndarray) -> list[bytes]:
        return [self.dataset.read_bytes(int(i)) for i in ids]

    def _files(self, key: tuple, ids: np.ndarray) -> list[bytes]:
        """The encoded files of `ids`, from the read-ahead when it read exactly these."""
        if self._ahead is not None and self._ahead[0] == key:
            files = self._ahead[1].result()
        else:
            files = self._read(ids)
        self._ahead = None
        return files

    def _upload(self, tensor: Tensor) -> Tensor:
        if self.pinned:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _params_on_device(self, params: MoCoV2Params) -> MoCoV2Params:
        return MoCoV2Params(**{name: self._upload(value) for name, value in vars(params).items()})

    # ------------------------------------------------------------------ views
    def _moco_view(self, images: list[Tensor], params: MoCoV2Params) -> Tensor:
        x = crop_views(images, params.boxes.tolist(), self.image_size)
        p = self._params_on_device(params)
        x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return self.augment.colour(x, p)

    def _anchor(self, images: list[Tensor]) -> Tensor:
        return normalize_float(torch.stack([self.anchor_geometry(image.float()) for image in images]).div_(255.0))

    def _views(self, ids: np.ndarray, files: list[bytes], n_views: int, generator: torch.Generator
               ) -> tuple[list[Tensor], Tensor]:
        images = decode_images(files, self.device, lambda i: self.dataset.describe(int(ids[i])), self.stream)
        heights = torch.tensor([image.shape[1] for image in images])
        widths = torch.tensor([image.shape[2] for image in images])
        views = [self._moco_view(images, self.augment.sample_params(len(images), heights, widths, generator))
                 for _ in range(n_views)]
        return views, self._anchor(images)

    # ------------------------------------------------------------------ the feeder interface
    def batch_at(self, entries: tuple[np.ndarray, np.ndarray], order: np.ndarray, step: int,
                 batch_size: int, rank: int, world: int, generator: torch.Generator) -> Batch:
        """Batch `step` (this rank's share), its parameters drawn from `generator` (a CPU one);
        the next batch's files are read meanwhile on a host thread."""
        ids, is_old = entries
        pos = rank_positions(order, step, batch_size, rank, world)
        files = self._files((id(ids), len(ids), step, batch_size, rank, world), ids[pos])
        if step + 1 < steps_per_epoch(len(ids), batch_size):
            following = ids[rank_positions(order, step + 1, batch_size, rank, world)]
            self._ahead = ((id(ids), len(ids), step + 1, batch_size, rank, world),
                           self._reader.submit(self._read, following))
        (q, k), anchor = self._views(ids[pos], files, 2, generator)
        old_host, old_all = old_flags(is_old, order, step, batch_size, rank, world)
        return Batch(q=q, k=k, anchor=anchor, is_old=self._upload(torch.from_numpy(old_host)),
                     ids=torch.from_numpy(ids[pos]), old_host=old_host, old_all_host=old_all)

    def batches(self, entries: tuple[np.ndarray, np.ndarray], order: np.ndarray, batch_size: int,
                rank: int, world: int, start_step: int, generator: torch.Generator) -> Iterator[Batch]:
        """The epoch's batches from `start_step` on, batch s from `step_generator(generator, s)`."""
        for step in range(start_step, steps_per_epoch(len(entries[0]), batch_size)):
            yield self.batch_at(entries, order, step, batch_size, rank, world,
                                step_generator(generator, step, self.draw_device))

    def views(self, ids: np.ndarray, n_views: int, batch_size: int,
              generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """(views (V, b, 3, S, S), anchor (b, ...)) chunks over `ids`, for replay selection; chunk
        c draws from `step_generator(generator, c)`."""
        for chunk, start in enumerate(range(0, len(ids), batch_size)):
            part = np.asarray(ids[start:start + batch_size])
            views, anchor = self._views(part, self._read(part), n_views,
                                        step_generator(generator, chunk, self.draw_device))
            yield torch.stack(views), anchor
