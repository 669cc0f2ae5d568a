"""`open_dataset`: turn what the user typed (`--data`, `--dataset`) into an `ImageDataset`.

Detection is by content, not by name: a zip archive is a zip, a folder holding CIFAR pickles is
CIFAR, any other folder must have the ImageNet layout. The user can force a kind when detection
would guess wrong (e.g. to download CIFAR into an empty folder).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from cclnb.data.base import ImageDataset
from cclnb.data.cifar import detect_cifar, open_cifar
from cclnb.data.demo import open_demo
from cclnb.data.folder import FolderDataset, ZipDataset
from cclnb.config import check_class_selection
from cclnb.data.shapes import open_shapes
from cclnb.errors import ConfigError, DataError

KINDS = ("auto", "imagefolder", "zip", "cifar10", "cifar100", "demo")
SPLITS = ("train", "val")
DEMO_DATA = ("demo", "demo-digits")   # `--data` names of the embedded datasets (shapes, digits)


def detect_kind(path: Path) -> str:
    """The kind of the data at an existing `path` ("zip", "cifar10", "cifar100", "imagefolder")."""
    if path.is_file():
        if zipfile.is_zipfile(path):
            return "zip"
        raise DataError(f"{path} is a file but not a zip archive; pass a dataset folder, a zip of one, "
                        f"or 'demo'")
    return detect_cifar(path) or "imagefolder"


def open_dataset(data: str | None, split: str = "train", kind: str = "auto",
                 imagenetsub: bool = False, download: bool = False, classes: str | None = None) -> ImageDataset:
    """Open one split of a dataset.

    `data` is a folder (`<root>/<split>/<class>/<image>`), a zip archive of one, a CIFAR pickle
    folder (or its parent), "demo" for the embedded shapes (the demo study's data), or
    "demo-digits" for the embedded scikit-learn digits (random features already separate them). `imagenetsub` keeps the first 100
    classes in sorted order (the authors' ImageNet-Sub), `classes` a range of them ('101-200',
    `cclnb.data.selection`); `download` fetches CIFAR if absent.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose 'train' or 'val'")
    check_class_selection(imagenetsub, classes)
    if kind == "demo" or (kind == "auto" and data in DEMO_DATA):
        if imagenetsub:
            raise ConfigError("--imagenetsub needs 100 classes; the demo datasets have 10: drop --imagenetsub")
        if classes is not None:
            raise ConfigError(f"--classes selects classes of ImageNet-layout data (a folder or a zip); the demo "
                              f"datasets are not: drop --classes {classes}")
        return open_demo(split) if data == "demo-digits" else open_shapes(split)
    if not data:
        raise ConfigError("no dataset given: pass --data PATH (a folder, a zip, a CIFAR folder) or "
                          "--data demo for the embedded demo dataset")
    path = Path(data).expanduser()
    if kind in ("cifar10", "cifar100"):
        if imagenetsub or classes is not None:
            raise ConfigError(f"{'--imagenetsub' if imagenetsub else '--classes'} applies to ImageNet-layout data, "
                              f"not CIFAR: drop it")
        return open_cifar(path, kind, split, download)
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist; check --data (a folder with train/ and "
                        f"val/, a zip archive of one, a CIFAR folder, or 'demo')")
    detected = detect_kind(path) if kind == "auto" else kind
    if detected in ("cifar10", "cifar100"):
        return open_dataset(data, split, detected, imagenetsub, download, classes)
    if detected == "zip":
        if not path.is_file():
            raise DataError(f"--dataset zip needs a zip archive, but {path} is a folder; use --dataset "
                            f"imagefolder or auto")
        return ZipDataset(path, split, imagenetsub, classes)
    if not path.is_dir():
        raise DataError(f"--dataset imagefolder needs a folder, but {path} is a file; use --dataset "
                        f"zip or auto")
    return FolderDataset(path, split, imagenetsub, classes)


def open_run_data(config: Any, split: str) -> ImageDataset:
    """One split of the data a run's configuration names (a `TrainConfig`): its path, kind, class
    selection and download flag, read in one place by every stage that opens a run's data."""
    return open_dataset(config.data, split, config.dataset, config.imagenetsub, config.download,
                        config.classes)


def run_data_key(config: Any) -> tuple:
    """What decides which data `open_run_data` opens: equal keys, the same dataset."""
    return config.data, config.dataset, config.imagenetsub, config.download, config.classes
