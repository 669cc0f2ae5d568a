"""Decode-once cache: a file-backed dataset of small images as one (N, H, W, 3) uint8 `.npy`.

Decoding 55,000 JPEGs costs seconds every run; reading one 160 MB array costs a fraction of one.
The array is keyed by the source's identity (path, size, mtime, split, ImageNet-Sub), so a
changed dataset gets a new file instead of stale pixels. It is written to a temporary name,
fsynced and renamed, so a reader never sees half a file and two processes racing to build it
both end with a valid one (a lock lets the second simply wait and reuse the first's work).
Large datasets are decoded by a pool of processes, each over its own chunk of ids, writing
straight into the memory-mapped temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cclnb.data.base import ArrayDataset, ImageDataset
from cclnb.errors import ConfigError, DataError

MAX_CACHED_SIZE = 64       # larger images go through the PIL / DataLoader-workers path
_CHUNK = 2048              # images per pool task: big enough to amortize, small enough to balance
_POOL_MIN = 16384          # a pool starts in ~3 s (imports, zip index per worker): worth it above ~5 s of work
_MAX_WORKERS = 8


def default_cache_dir() -> Path:
    """`$CCLNB_CACHE` if set, else `~/.cache/cclnb`."""
    return Path(os.environ.get("CCLNB_CACHE") or Path.home() / ".cache" / "cclnb").expanduser()


def cache_path(ds: ImageDataset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `ds`'s cache lives: `<dir>/<name>-<split>-<hash of identity>.npy`."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", ds.name)
    key = hashlib.sha256(ds.identity().encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"{slug}-{ds.split}-{key}.npy"


def _checked_ids(ds: ImageDataset, ids: np.ndarray | None) -> np.ndarray | None:
    if ids is None:
        return None
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ConfigError(f"ids must be a 1-D array of integer sample ids, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(ds)):
        raise ConfigError(f"sample ids must lie in [0, {len(ds)}) for {ds.name}/{ds.split}; got "
                          f"{ids.min()}..{ids.max()}")
    return ids


def _equal_size(ds: ImageDataset) -> int:
    if ds.image_size is None:
        raise DataError(f"{ds.name}/{ds.split} has images of different sizes (or not square); the "
                        f"uint8 array cache needs equal-size square images. Use the PIL path "
                        f"(--loader workers) for this dataset, or resize it once beforehand.")
    return ds.image_size


def _decode_into(ds: ImageDataset, ids: np.ndarray, out: np.ndarray, size: int,
                 bar: tqdm | None = None) -> None:
    """Decode sample `ids[j]` into `out[j]`, refusing any image that is not `size` x `size`."""
    for row, i in enumerate(ids):
        image = ds.load_pil(int(i))
        if image.size != (size, size):
            raise DataError(f"image {ds.describe(int(i))} is {image.size[0]}x{image.size[1]} but the "
                            f"dataset's images are {size}x{size}: the uint8 cache needs equal-size "
                            f"images. Resize it, or use the PIL path (--loader workers).")
        out[row] = np.asarray(image)
        if bar is not None:
            bar.update(1)


_worker_state: dict = {}


def _init_worker(ds: ImageDataset, out_path: str, size: int) -> None:
    """Pool initializer: receive the dataset once per worker, so its zip is opened once, not per chunk."""
    _worker_state.update(ds=ds, out=np.load(out_path, mmap_mode="r+"), size=size)


def _decode_chunk(start: int, stop: int) -> int:
    """Pool task: decode ids [start, stop) into rows [start, stop) of the memory-mapped file."""
    out = _worker_state["out"]
    _decode_into(_worker_state["ds"], np.arange(start, stop), out[start:stop], _worker_state["size"])
    out.flush()
    return stop - start


def _worker_count() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_WORKERS))


def _fill(ds: ImageDataset, out_path: Path, size: int, progress: bool) -> None:
    """Decode every sample of `ds` into the .npy at `out_path` (already allocated)."""
    n = len(ds)
    workers = _worker_count()
    with tqdm(total=n, desc=f"decoding {ds.name}/{ds.split}", unit="img", disable=not progress) as bar:
        if workers == 1 or n < _POOL_MIN:
            out = np.load(out_path, mmap_mode="r+")
            _decode_into(ds, np.arange(n), out, size, bar)
            out.flush()
            del out
            return
        # fork where the OS has it: a spawned child re-imports the caller's `__main__`, and a script
        # without a `__main__` guard would then call load_uint8 again and wait forever on the
        # build lock its parent holds. The workers only decode with PIL into a memory map (no
        # torch, no CUDA), which is what fork is safe for, as in DataLoader workers.
        context = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context(context),
                                 initializer=_init_worker, initargs=(ds, str(out_path), size)) as pool:
            futures = [pool.submit(_decode_chunk, start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK)]
            try:
                for future in as_completed(futures):
                    bar.update(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside the cache file, so concurrent builders wait instead of duplicating."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the result correct
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_cache(path: Path, expected: tuple[int, ...], mmap: bool) -> np.ndarray | None:
    """The cached array, or None (with a warning) if it is unreadable or has the wrong shape."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as error:
        warnings.warn(f"ignoring unreadable cache {path} ({error}); rebuilding it", stacklevel=3)
        return None
    if array.shape != expected or array.dtype != np.uint8:
        warnings.warn(f"ignoring cache {path}: {array.dtype} {array.shape}, expected uint8 {expected}; "
                      f"rebuilding it", stacklevel=3)
        return None
    return array


def _build(ds: ImageDataset, path: Path, size: int, progress: bool) -> None:
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy")
    try:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ds), size, size, 3)).flush()
        _fill(ds, tmp, size, progress)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise DataError(f"cannot write the image cache {path}: {error}; free disk space or point "
                        f"$CCLNB_CACHE (or --cache-dir) at a writable folder") from error
    finally:
        tmp.unlink(missing_ok=True)


def load_uint8(ds: ImageDataset, cache_dir: str | os.PathLike | None = None, progress: bool = True,
               ids: np.ndarray | None = None) -> np.ndarray:
    """Every sample of `ds` (or only `ids`, in that order) as an (N, H, W, 3) uint8 array.

    Array-backed datasets (CIFAR, demo) return their pixels directly (treat them as read-only).
    File-backed datasets of images <= 64 px are decoded once into a cache file under `cache_dir`
    (default `$CCLNB_CACHE` or `~/.cache/cclnb`) and read from it afterwards. With `ids`, only
    those images are decoded unless the full cache already exists, or unless they are at least
    half of the dataset (a training run's ids): then the full cache is built, so the next run
    starts fast. Larger images are not cached:
    only `ids` loads are allowed for them (a full array of them would not fit in memory).
    """
    ids = _checked_ids(ds, ids)
    if isinstance(ds, ArrayDataset):
        return ds.images if ids is None else ds.images[ids]
    size = _equal_size(ds)
    shape = (len(ds), size, size, 3)
    if size > MAX_CACHED_SIZE and ids is None:
        raise DataError(f"{ds.name}/{ds.split} has {size}x{size} images; the uint8 array path holds "
                        f"images up to {MAX_CACHED_SIZE} px (a full array would need "
                        f"{len(ds) * size * size * 3 / 2**30:.1f} GiB). Use the PIL path (--loader workers).")
    path = cache_path(ds, cache_dir)
    if size <= MAX_CACHED_SIZE and path.is_file():
        cached = _read_cache(path, shape, mmap=ids is not None)
        if cached is not None:
            return cached if ids is None else np.ascontiguousarray(cached[ids])
    if ids is not None and (size > MAX_CACHED_SIZE or 2 * len(np.unique(ids)) < len(ds)):
        out = np.empty((len(ids), size, size, 3), dtype=np.uint8)
        with tqdm(total=len(ids), desc=f"decoding {ds.name}/{ds.split}", unit="img",
                  disable=not progress) as bar:
            _decode_into(ds, ids, out, size, bar)
        return out
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the cache folder {path.parent}: {error}; point $CCLNB_CACHE "
                        f"(or --cache-dir) at a writable folder") from error
    with _build_lock(path):
        cached = _read_cache(path, shape, mmap=False) if path.is_file() else None
        if cached is None:
            _build(ds, path, size, progress)
            cached = np.load(path)
    return cached if ids is None else cached[ids]
