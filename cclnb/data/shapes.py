"""The embedded demo dataset: ten classes of shapes and textures drawn by code at first use.

Why it exists: the demo study must show, in a few CPU minutes and without a download, what the
methods do, so the data must be one on which MoCo v2 visibly learns. The scikit-learn digits
(`demo-digits`) are not: a random ResNet already separates them (80% kNN), so a short run has
nothing to add. Here a class is a *form* (stripes of one orientation, a checkerboard, a grid of
dots, a disk, a square, a triangle, a ring, a plus, a diamond) while everything MoCo v2's
augmentations vary is a nuisance drawn per image: the brightness of the foreground and of the
background, which is the brighter, a slight tint (colour jitter, grayscale), the position, size,
stripe period and phase (random resized crop), plus pixel noise. Random features follow brightness,
contrast and position, so the demo's untrained encoder scores 30-33% kNN, and its probe top-1
rises from about 36% to 41-61% in a few hundred MoCo steps. Every class is symmetric under a
horizontal flip, so MoCo's flip never maps one class onto another. The forms are laid out on a
canvas 16 units wide and drawn at 32 px: at 16 px a short continual run barely learned more than
random features find (docs/study.md, "The demo preset"); drawn at 32 px, the same geometry gives
the crops and the 3x3 stem edges to learn from, at about 1.6x the CPU time of a step.

Built from a fixed seed with IEEE-exact arithmetic only (+, -, *, /, sqrt, floor, comparisons;
no sin, exp or Gaussian draws, whose last bit can differ between CPUs' maths libraries), so every
machine gets the same bytes. Each pixel averages 4x4 sub-pixels (an exact k/16 coverage), which
smooths the edges.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from cclnb.data.base import ArrayDataset

SHAPES_NAME = "demo-shapes"
SHAPES_SIZE = 32            # pixels per side
_CANVAS = 16.0              # the geometry's units per side: every size and spacing below is in them
SHAPES_CLASSES = ("hstripes", "vstripes", "checker", "dots", "disk", "square", "triangle", "ring",
                  "plus", "diamond")
TRAIN_PER_CLASS = 200
VAL_PER_CLASS = 60
_SEED = 2107_01776          # the paper's arXiv number: any fixed value would do
_SUPERSAMPLE = 4
_MIN_CONTRAST = 0.35        # grey levels of foreground and background in [0, 1] differ by at least this
_TINT = 0.15                # each RGB channel moves by up to this from its grey level
_NOISE = 0.07               # pixel noise: uniform in [-_NOISE, _NOISE]

# A sub-pixel grid in canvas units, centred on the image: (1, S*k, S*k) arrays y and x.
_GRID = ((np.arange(SHAPES_SIZE * _SUPERSAMPLE, dtype=np.float64) + 0.5) / _SUPERSAMPLE - SHAPES_SIZE / 2) \
    * (_CANVAS / SHAPES_SIZE)
_Y, _X = _GRID[None, :, None], _GRID[None, None, :]


def _col(values: np.ndarray) -> np.ndarray:
    """Per-image parameters (n,) broadcast against the (1, H, W) grid."""
    return values[:, None, None]


def _stripes(rng: np.random.RandomState, n: int, axis: str) -> np.ndarray:
    period = _col(rng.uniform(3.0, 6.0, n))
    phase = _col(rng.uniform(0.0, 1.0, n))
    coordinate = _Y if axis == "y" else _X
    return np.floor(coordinate / period + phase) % 2 == 0


def _hstripes(rng: np.random.RandomState, n: int) -> np.ndarray:
    return _stripes(rng, n, "y")


def _vstripes(rng: np.random.RandomState, n: int) -> np.ndarray:
    return _stripes(rng, n, "x")


def _checker(rng: np.random.RandomState, n: int) -> np.ndarray:
    cell = _col(rng.uniform(2.0, 4.0, n))
    phase_y, phase_x = (_col(rng.uniform(0.0, 1.0, n)) for _ in range(2))
    return (np.floor(_Y / cell + phase_y) + np.floor(_X / cell + phase_x)) % 2 == 0


def _dots(rng: np.random.RandomState, n: int) -> np.ndarray:
    spacing = _col(rng.uniform(4.0, 6.0, n))
    radius = spacing * _col(rng.uniform(0.22, 0.32, n))
    phase_y, phase_x = (_col(rng.uniform(0.0, 1.0, n)) for _ in range(2))
    dy = (_Y / spacing + phase_y) % 1 - 0.5
    dx = (_X / spacing + phase_x) % 1 - 0.5
    return (dy * dy + dx * dx) * spacing * spacing <= radius * radius


def _placed(rng: np.random.RandomState, n: int, low: float, high: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A size in [low, high] canvas units and the offsets (dy, dx) from a centre that keeps the
    shape inside."""
    size = rng.uniform(low, high, n)
    room = _CANVAS / 2 - 0.5 - size
    cy, cx = (rng.uniform(-1.0, 1.0, n) * room for _ in range(2))
    return _col(size), _Y - _col(cy), _X - _col(cx)


def _disk(rng: np.random.RandomState, n: int) -> np.ndarray:
    r, dy, dx = _placed(rng, n, 3.0, 6.0)
    return dy * dy + dx * dx <= r * r


def _square(rng: np.random.RandomState, n: int) -> np.ndarray:
    r, dy, dx = _placed(rng, n, 2.5, 5.5)
    return (np.abs(dy) <= r) & (np.abs(dx) <= r)


def _triangle(rng: np.random.RandomState, n: int) -> np.ndarray:
    # apex up: inside when below the top edge's two sides and above the base
    r, dy, dx = _placed(rng, n, 3.0, 6.0)
    return (dy <= r) & (2 * np.abs(dx) <= dy + r)


def _ring(rng: np.random.RandomState, n: int) -> np.ndarray:
    r, dy, dx = _placed(rng, n, 3.5, 6.5)
    inner = r - _col(rng.uniform(1.0, 1.75, n))
    distance = np.sqrt(dy * dy + dx * dx)
    return (distance <= r) & (distance >= inner)


def _plus(rng: np.random.RandomState, n: int) -> np.ndarray:
    r, dy, dx = _placed(rng, n, 3.0, 6.0)
    half = _col(rng.uniform(0.5, 1.0, n))
    inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    return inside & ((np.abs(dy) <= half) | (np.abs(dx) <= half))


def _diamond(rng: np.random.RandomState, n: int) -> np.ndarray:
    r, dy, dx = _placed(rng, n, 3.5, 6.5)
    return np.abs(dy) + np.abs(dx) <= r


_DRAW: dict[str, Callable[[np.random.RandomState, int], np.ndarray]] = {
    "hstripes": _hstripes, "vstripes": _vstripes, "checker": _checker, "dots": _dots, "disk": _disk,
    "square": _square, "triangle": _triangle, "ring": _ring, "plus": _plus, "diamond": _diamond}


def _colours(rng: np.random.RandomState, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB in [0, 1], (n, 3) each: two grey levels at least
    `_MIN_CONTRAST` apart (either may be the brighter), each tinted by up to `_TINT` per channel.

    Why not any colour: MoCo learns whatever tells two images apart and survives its
    augmentations, and a colour drawn from the whole RGB cube survives colour jitter (hue moves by
    at most 0.1): trained on such images the encoder encodes colour, not form (Joint, 5 epochs,
    seed 0: kNN 22.7 against the untrained encoder's 21.5; with grey levels and a small tint: 61.0
    against 34.2; docs/study.md, "The demo preset"). Brightness, contrast and polarity are what
    the jitter does vary, so they stay nuisances that defeat random features.
    """
    grey = rng.uniform(0.0, 1.0, (n, 2))
    close = np.abs(grey[:, 0] - grey[:, 1]) < _MIN_CONTRAST
    while close.any():
        grey[close] = rng.uniform(0.0, 1.0, (int(close.sum()), 2))
        close = np.abs(grey[:, 0] - grey[:, 1]) < _MIN_CONTRAST
    fg = np.clip(grey[:, :1] + rng.uniform(-_TINT, _TINT, (n, 3)), 0.0, 1.0)
    bg = np.clip(grey[:, 1:] + rng.uniform(-_TINT, _TINT, (n, 3)), 0.0, 1.0)
    return fg, bg


def draw_class(name: str, n: int, rng: np.random.RandomState) -> np.ndarray:
    """`n` images of one class, (n, 32, 32, 3) uint8."""
    k = _SUPERSAMPLE
    side = SHAPES_SIZE * k
    inside = np.broadcast_to(_DRAW[name](rng, n), (n, side, side)).reshape(n, SHAPES_SIZE, k, SHAPES_SIZE, k)
    # the count of covered sub-pixels over k*k: exactly the mean of 0/1 floats, without a float array of them
    coverage = (inside.sum(axis=(2, 4), dtype=np.int32) / (k * k))[..., None]
    fg, bg = _colours(rng, n)
    pixels = bg[:, None, None, :] * (1 - coverage) + fg[:, None, None, :] * coverage
    pixels += rng.uniform(-_NOISE, _NOISE, pixels.shape)
    return np.uint8(np.floor(np.clip(pixels, 0.0, 1.0) * 255 + 0.5))


@functools.lru_cache(maxsize=1)
def _shapes_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, targets, train ids, val ids), built once per process: each
    class from its own seed, train images first, so a class's images never depend on another's."""
    per_class = TRAIN_PER_CLASS + VAL_PER_CLASS
    images = np.concatenate([draw_class(name, per_class, np.random.RandomState([_SEED, c]))
                             for c, name in enumerate(SHAPES_CLASSES)])
    targets = np.repeat(np.arange(len(SHAPES_CLASSES), dtype=np.int64), per_class)
    position = np.tile(np.arange(per_class), len(SHAPES_CLASSES))
    ids = np.arange(len(targets))
    return images, targets, ids[position < TRAIN_PER_CLASS], ids[position >= TRAIN_PER_CLASS]


def open_shapes(split: str) -> ArrayDataset:
    """One split of the shapes dataset ("train": 2,000 images, "val": 600; 10 classes)."""
    images, targets, train_ids, val_ids = _shapes_arrays()
    ids = train_ids if split == "train" else val_ids
    return ArrayDataset(name=SHAPES_NAME, kind="demo", split=split, classes=list(SHAPES_CLASSES),
                        images=images[ids], targets=targets[ids], identity=f"{SHAPES_NAME}|v2|{split}")
