"""The dataset contract every source (folder, zip, CIFAR, demo) fulfils.

A split of a labelled image dataset is a list of samples whose *id is its position*: positions in
the sorted file list are the same on every machine and every run, so replay buffers and resumed
runs can store ids instead of file names. Two families exist: file-backed datasets decode one
image on demand (and are cached as a uint8 array by `cclnb.data.cache`), array-backed datasets
(CIFAR, demo) already hold every pixel in memory.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from cclnb.errors import ConfigError, DataError

# The extensions torchvision's ImageFolder accepts, so both see the same files.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    """True for a file name torchvision's ImageFolder would load (case-insensitive extension)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode encoded image bytes to RGB, or raise a DataError that names the file.

    Decoding is forced here (`load`) so a truncated JPEG fails now, with its
    name, instead of deep inside a DataLoader worker.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode image {where}: {error}. The file is corrupt or not an "
                        f"image; replace it or delete it from the dataset.") from error


class ImageDataset:
    """One split ("train" or "val") of a labelled image dataset.

    Attributes (see docs/architecture.md): `name`, `kind`, `split`, `classes` (label index ->
    class name, sorted folder names for folders), `class_names` (human-readable names, e.g. from
    a `classes.tsv`; equal to `classes` when none are known), `targets` (int64 (N,), the label of
    each sample id) and `image_size` (side length when every image is square and equal, else None).
    """

    name: str
    kind: str
    split: str
    classes: list[str]
    class_names: list[str]
    targets: np.ndarray
    image_size: int | None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def load_pil(self, i: int) -> Image.Image:
        """Sample `i` as an RGB PIL image; a corrupt file raises a DataError naming it."""
        raise NotImplementedError

    def identity(self) -> str:
        """A string that changes whenever the source's pixels may have changed: the cache key."""
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where sample `i` comes from, for error messages (a file name where there is one)."""
        return f"{self.name}/{self.split}[{i}]"

    def __repr__(self) -> str:
        size = f"{self.image_size}x{self.image_size}" if self.image_size else "mixed sizes"
        return (f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, split={self.split!r}, "
                f"classes={len(self.classes)}, samples={len(self)}, image_size={size})")


class ArrayDataset(ImageDataset):
    """A dataset whose pixels are already an (N, H, W, 3) uint8 array (CIFAR, demo)."""

    def __init__(self, *, name: str, kind: str, split: str, classes: list[str], images: np.ndarray,
                 targets: np.ndarray, identity: str, class_names: list[str] | None = None) -> None:
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise DataError(f"{name}: expected (N, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
        self.name, self.kind, self.split = name, kind, split
        self.classes = list(classes)
        self.class_names = list(class_names) if class_names is not None else list(classes)
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        height, width = images.shape[1:3]
        self.image_size = int(height) if height == width else None
        self._identity = identity

    def load_pil(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def identity(self) -> str:
        return self._identity


def subset_per_class(targets: np.ndarray, n: int) -> np.ndarray:
    """The first `n` sample ids of every class (all of a class with fewer), sorted ascending.

    "First" means lowest ids, i.e. the first files in sorted order: the same subset on every
    machine, which quick runs (`--subset-per-class`) need in order to be comparable.
    """
    if n < 1:
        raise ConfigError(f"subset_per_class needs n >= 1 images per class, got {n}")
    targets = np.asarray(targets)
    order = np.argsort(targets, kind="stable")
    sorted_targets = targets[order]
    starts = np.searchsorted(sorted_targets, sorted_targets, side="left")
    rank_in_class = np.arange(len(order)) - starts
    return np.sort(order[rank_in_class < n]).astype(np.int64)
