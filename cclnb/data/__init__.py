"""The first stage: images, their labels, the tasks they form and the views training sees.

Labelled image datasets (folder, zip, CIFAR, embedded demo) and their decode-once uint8 cache;
`tasks` (class order and split), `augment` (MoCo v2 views, per image or batched on the device)
and `batches` (the feeders that turn sample ids into training batches). No models and no methods
live here: this stage only answers "which images, with which labels, in which order, seen how".
May import only the shared basics (`cclnb.errors`, `cclnb.config`). See docs/data.md.
"""

from cclnb.data.base import IMG_EXTENSIONS, ArrayDataset, ImageDataset, subset_per_class
from cclnb.data.cache import cache_path, default_cache_dir, load_uint8
from cclnb.data.folder import FolderDataset, ZipDataset
from cclnb.data.source import KINDS, open_dataset, open_run_data, run_data_key

__all__ = [
    "IMG_EXTENSIONS", "KINDS", "ArrayDataset", "FolderDataset", "ImageDataset", "ZipDataset",
    "cache_path", "default_cache_dir", "load_uint8", "open_dataset", "open_run_data", "run_data_key", "subset_per_class",
]
