"""Shared fixtures: the real data in ../shared/data, the demo dataset, a tiny synthetic image folder,
and a cache folder shared by the whole test run.

Real data is found relative to this file (`<repo>/../shared/data`), never copied into the repo;
tests that need it are skipped with a message saying what is missing. Every test process writes
the uint8 cache into one run-wide temporary folder (`$CCLNB_CACHE` is pointed there), so tests
never touch the user's ~/.cache and the pytest-xdist workers reuse each other's caches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cclnb.data import ImageDataset, open_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist every worker gets one thread (and so do the processes it starts):
    with 2 workers on 2 cores, 2 BLAS threads per worker oversubscribe the CPU and run the
    small-tensor tests about ten times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def write_image_folder(root: Path, n_classes: int = 3, per_class: int = 4, size: int = 32,
                       splits: tuple[str, ...] = ("train", "val"), ext: str = ".png",
                       seed: int = 0) -> Path:
    """An ImageNet-layout folder `root/<split>/class_<k>/img_<i><ext>` of random RGB images.

    PNG by default, so pixels survive the round trip exactly. Returns `root`.
    """
    rng = np.random.RandomState(seed)
    for split in splits:
        for k in range(n_classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}{ext}")
    return root


def study_cli(tmp: Path, *argv: str) -> list[str]:
    """The command line `cclnb study ARGV` with its runs and reports under `tmp`."""
    return ["study", *argv, "--runs-root", str(tmp / "runs"), "--reports-root", str(tmp / "reports")]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """`<repo>/../shared/data` (the project's real datasets), or skip saying it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is missing (tests look for ../shared/data next to "
                    f"the repository); put tiny-imagenet-32-sub100.zip there to run this test")
    return SHARED_DATA


def _shared_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{path} is missing; copy {name} into {folder} to run this test")
    return path


@pytest.fixture(scope="session")
def sub100_zip(shared_data_dir: Path) -> Path:
    """Tiny-ImageNet-32, first 100 classes (50,000 train / 5,000 val): the ImageNet-Sub stand-in."""
    return _shared_file(shared_data_dir, "tiny-imagenet-32-sub100.zip")


@pytest.fixture(scope="session")
def tin200_zip(shared_data_dir: Path) -> Path:
    """Tiny-ImageNet-32, all 200 classes (100,000 train / 10,000 val): the ImageNet-Full stand-in."""
    return _shared_file(shared_data_dir, "tiny-imagenet-32.zip")


@pytest.fixture(scope="session")
def sub100_train(sub100_zip: Path) -> ImageDataset:
    return open_dataset(str(sub100_zip), "train")


@pytest.fixture(scope="session")
def sub100_val(sub100_zip: Path) -> ImageDataset:
    return open_dataset(str(sub100_zip), "val")


@pytest.fixture(scope="session")
def demo_train() -> ImageDataset:
    """The embedded demo dataset's train split (2,000 shapes, 32x32 RGB, 10 classes)."""
    return open_dataset("demo", "train")


@pytest.fixture(scope="session")
def demo_val() -> ImageDataset:
    return open_dataset("demo", "val")


@pytest.fixture()
def tiny_folder(tmp_path: Path) -> Path:
    """A fresh 3-class ImageNet-layout folder of 32x32 PNGs (4 train, 4 val images per class)."""
    return write_image_folder(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tmp_cache_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """One cache folder for the whole run: under pytest-xdist, all workers share it (their base
    temp folders have a common parent), so an expensive cache is built once per run."""
    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):   # an xdist worker: share with the other workers
        base = base.parent
    path = base / "cclnb-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_cache_dir: Path) -> Iterator[None]:
    """Point the default cache (`$CCLNB_CACHE`) at the run's temporary folder, then restore it."""
    previous = os.environ.get("CCLNB_CACHE")
    os.environ["CCLNB_CACHE"] = str(tmp_cache_dir)
    yield
    if previous is None:
        os.environ.pop("CCLNB_CACHE", None)
    else:
        os.environ["CCLNB_CACHE"] = previous
