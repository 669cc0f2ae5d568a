"""CIFAR-10/100 from the standard python-pickle folders (`cifar-10-batches-py`, `cifar-100-python`).

The pickles already hold uint8 pixels, so these datasets live in memory and need no cache. The
network is used only when the user asks (`download=True`), through torchvision's downloader
(imported only then), and an offline machine gets an error that says where the data was looked
for and how to put it there.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from cclnb.data.base import ArrayDataset
from cclnb.errors import DataError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# kind -> (folder name, train files, val files, meta file, label key, label-names key)
_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def find_cifar_dir(path: Path, kind: str) -> Path | None:
    """The pickle folder for `kind` at `path` itself or directly inside it, if there is one."""
    folder, train_files, *_ = _LAYOUTS[kind]
    for candidate in (path, path / folder):
        if (candidate / train_files[0]).is_file():
            return candidate
    return None


def detect_cifar(path: Path) -> str | None:
    """"cifar10" / "cifar100" when `path` holds (or is) one of the pickle folders, else None."""
    for kind in _LAYOUTS:
        if find_cifar_dir(path, kind) is not None:
            return kind
    return None


def _unpickle(file: Path) -> dict:
    try:
        with open(file, "rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataError(f"cannot read CIFAR file {file}: {error}; delete the folder and download again "
                        f"({CIFAR_URL})") from error


def _download(path: Path, kind: str) -> None:
    """Fetch the archive through torchvision into `path` (which then holds the pickle folder)."""
    from torchvision import datasets  # only here: importing torchvision costs seconds

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    try:
        path.mkdir(parents=True, exist_ok=True)
        cls(root=str(path), train=True, download=True)
    except Exception as error:  # urllib, socket, ssl and checksum errors all mean "no data"
        raise DataError(f"downloading {kind} into {path} failed ({type(error).__name__}: {error}). "
                        f"Offline? Fetch the python version from {CIFAR_URL} and extract it into "
                        f"{path}") from error


def open_cifar(path: Path, kind: str, split: str, download: bool) -> ArrayDataset:
    """One split of CIFAR-10 or CIFAR-100 ("val" = the test batch, as in the paper)."""
    folder, train_files, val_files, meta_file, label_key, names_key = _LAYOUTS[kind]
    found = find_cifar_dir(path, kind)
    if found is None and download:
        _download(path, kind)
        found = find_cifar_dir(path, kind)
    if found is None:
        raise DataError(f"no {kind} data at {path} (looked for {path / train_files[0]} and "
                        f"{path / folder / train_files[0]}); pass --download to fetch it through "
                        f"torchvision, or download the python version from {CIFAR_URL} and extract "
                        f"it into {path}")
    files = [found / f for f in (train_files if split == "train" else val_files)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"incomplete {kind} folder {found}: missing {', '.join(missing)}; "
                        f"download it again ({CIFAR_URL})")
    batches = [_unpickle(f) for f in files]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    targets = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    classes = list(_unpickle(found / meta_file)[names_key])
    stamps = ",".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return ArrayDataset(name=kind, kind=kind, split=split, classes=classes, images=images,
                        targets=targets, identity=f"{kind}|{found.resolve()}|{split}|{stamps}")
