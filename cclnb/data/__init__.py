"""Labelled image datasets (folder, zip, CIFAR, embedded demo) and their decode-once uint8 cache.

No models and no methods live here: this package only answers "which images, with which labels,
in which order". See docs/data.md for the formats, the cache and the demo dataset.
"""

from cclnb.data.base import IMG_EXTENSIONS, ArrayDataset, ImageDataset, subset_per_class
from cclnb.data.cache import cache_path, default_cache_dir, load_uint8
from cclnb.data.folder import FolderDataset, ZipDataset
from cclnb.data.source import KINDS, open_dataset

__all__ = [
    "IMG_EXTENSIONS", "KINDS", "ArrayDataset", "FolderDataset", "ImageDataset", "ZipDataset",
    "cache_path", "default_cache_dir", "load_uint8", "open_dataset", "subset_per_class",
]
