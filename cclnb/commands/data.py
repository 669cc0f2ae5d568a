"""`cclnb data info PATH` and `cclnb data cache PATH`: look at a dataset before training on it.

`info` answers "did cclnb read my data the way I think?" (kind, classes, counts, image size, and
the exact class split per task); `cache` decodes a small-image dataset into the uint8 cache ahead
of time, so a later (GPU) run starts without the decoding wait.
"""

from __future__ import annotations

import argparse
import time

from cclnb.data import KINDS, cache_path, load_uint8, open_dataset
from cclnb.data.base import ImageDataset
from cclnb.data.tasks import class_order, split_classes
from cclnb.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (("info", "kind, classes, counts, image size and the task split"),
                            ("cache", "build the decode-once uint8 cache and report its timing")):
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument("path", help="dataset folder, zip archive, CIFAR folder, or 'demo'")
        action.add_argument("--dataset", default="auto", choices=KINDS, help="dataset kind (default: detect)")
        action.add_argument("--imagenetsub", action="store_true", help="keep the first 100 classes")
        action.add_argument("--classes", default=None, metavar="FIRST-LAST",
                            help="keep a range of the sorted classes, counted from 1 (e.g. 101-200)")
        action.add_argument("--download", action="store_true", help="CIFAR: download if absent")
    info = actions.choices["info"]
    info.add_argument("--n-tasks", type=int, default=10, help="number of tasks (default 10)")
    info.add_argument("--order-seed", type=int, default=1, help="class-order seed (1 = the authors')")
    actions.choices["cache"].add_argument("--cache-dir", default=None,
                                          help="cache folder (default $CCLNB_CACHE or ~/.cache/cclnb)")


def _open_splits(args: argparse.Namespace) -> dict[str, ImageDataset]:
    """Train (required) and val (when present)."""
    splits = {"train": open_dataset(args.path, "train", args.dataset, args.imagenetsub, args.download, args.classes)}
    try:
        splits["val"] = open_dataset(args.path, "val", args.dataset, args.imagenetsub, args.download, args.classes)
    except DataError as error:
        print(f"(no val split: {error})")
    return splits


def _short(name: str) -> str:
    """The first of a comma-separated list of synonyms ("goldfish, Carassius auratus" -> "goldfish")."""
    return name.split(",")[0].strip()


def _info(args: argparse.Namespace) -> int:
    splits = _open_splits(args)
    train = splits["train"]
    order = class_order(len(train.classes), args.order_seed)
    tasks = split_classes(order, args.n_tasks)
    size = f"{train.image_size}x{train.image_size}" if train.image_size else "mixed (not all equal and square)"
    print(f"dataset:     {train.name}")
    print(f"kind:        {train.kind}")
    print(f"classes:     {len(train.classes)}")
    for split, ds in splits.items():
        print(f"{split + ':':<12} {len(ds):,} images")
    print(f"image size:  {size}")
    authors = " (the authors' order)" if args.order_seed == 1 else ""
    print(f"task split:  {args.n_tasks} tasks x {len(tasks[0])} classes, order seed {args.order_seed}{authors}")
    for t, classes in enumerate(tasks):
        print(f"  task {t}: classes {' '.join(str(c) for c in classes)}")
        if any(train.classes[c] != str(c) for c in classes):   # names that add something
            labels = [train.classes[c] if train.classes[c] == train.class_names[c]
                      else f"{train.classes[c]} ({_short(train.class_names[c])})" for c in classes]
            print(f"          {'; '.join(labels)}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    for split, ds in _open_splits(args).items():
        path = cache_path(ds, args.cache_dir)
        cached = path.is_file()
        start = time.perf_counter()
        images = load_uint8(ds, cache_dir=args.cache_dir)
        seconds = time.perf_counter() - start
        what = "loaded from" if cached else "built"
        where = path if ds.kind not in ("cifar10", "cifar100", "demo") else "memory (no cache needed)"
        print(f"{split}: {images.shape[0]:,} images {images.shape[1]}x{images.shape[2]}, "
              f"{what} {where} in {seconds:.1f} s")
    return 0


def run(args: argparse.Namespace) -> int:
    return _info(args) if args.action == "info" else _cache(args)
