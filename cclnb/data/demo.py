"""The embedded demo dataset: scikit-learn's digits as 32x32 RGB, no download needed.

It exists so the main job runs on a fresh machine with no data. The 8x8 grey digits are upsampled
to 32x32 and painted with a per-sample foreground and background colour (fixed seed), so colour
jitter and grayscale augmentations have something to act on, as they do on natural images. The
train/val split is stratified and fixed (80/20), so every machine sees the same ids.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from cclnb.data.base import ArrayDataset

DEMO_NAME = "demo-digits"
DEMO_SIZE = 32
_VAL_FRACTION = 0.2
_SEED = 0


@functools.lru_cache(maxsize=1)
def _demo_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images (N,32,32,3) uint8, targets, train ids, val ids), built once per process."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.stack([np.asarray(Image.fromarray(np.uint8(np.round(img * 255 / 16)))
                                .resize((DEMO_SIZE, DEMO_SIZE), Image.BICUBIC), dtype=np.float32) / 255
                     for img in digits.images])[..., None]
    rng = np.random.RandomState(_SEED)
    foreground = rng.uniform(0.45, 1.0, size=(len(grey), 1, 1, 3)).astype(np.float32)
    background = rng.uniform(0.0, 0.35, size=(len(grey), 1, 1, 3)).astype(np.float32)
    images = np.uint8(np.round(255 * (background * (1 - grey) + foreground * grey)))
    targets = digits.target.astype(np.int64)
    train_ids, val_ids = train_test_split(np.arange(len(targets)), test_size=_VAL_FRACTION,
                                          stratify=targets, random_state=_SEED)
    return images, targets, np.sort(train_ids), np.sort(val_ids)


def open_demo(split: str) -> ArrayDataset:
    """One split of the demo dataset ("train": 1,437 images, "val": 360; 10 classes)."""
    images, targets, train_ids, val_ids = _demo_arrays()
    ids = train_ids if split == "train" else val_ids
    return ArrayDataset(name=DEMO_NAME, kind="demo", split=split, classes=[str(d) for d in range(10)],
                        images=images[ids], targets=targets[ids], identity=f"{DEMO_NAME}|v1|{split}")
