"""The data layer: real-data counts, zip == folder, the uint8 cache, CIFAR, demo, and bad input."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import hashlib
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cclnb.commands import cli
from cclnb.config import TrainConfig
from cclnb.data import cache as cache_module
from cclnb.data import cache_path, load_uint8, open_dataset, subset_per_class
from cclnb.data.shapes import SHAPES_CLASSES, draw_class
from cclnb.errors import ConfigError, DataError
from tests.conftest import write_image_folder

DEMO_SHAPES_SHA256 = "b5fd973003a1664e179640ec4b634a2c47d5f6ac57f3867b1e3f179d4e305e0e"


def _decoded(ds, ids=None) -> np.ndarray:
    """Reference pixels: straight from `load_pil`, no cache involved."""
    ids = range(len(ds)) if ids is None else ids
    return np.stack([np.asarray(ds.load_pil(int(i))) for i in ids])


def _zip_folder(folder: Path, archive: Path, top: str | None, dir_entries: bool = False) -> Path:
    """Pack `folder` into `archive` (inside a `top/` folder when given), files only by default."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            name = f"{top}/{name}" if top else name
            if path.is_file():
                zf.write(path, name)
            elif dir_entries:
                zf.writestr(name + "/", b"")
    return archive


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any decode fail, to prove an answer came from the cache file."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("decoded an image although the cache should have been used")
    monkeypatch.setattr(cache_module, "_decode_into", refuse)


# ----------------------------------------------------------------------------- real data
def test_sub100_counts(sub100_train, sub100_val) -> None:
    for ds, per_class in ((sub100_train, 500), (sub100_val, 50)):
        assert ds.kind == "zip"
        assert len(ds.classes) == 100 and ds.classes == sorted(ds.classes)
        assert len(ds) == 100 * per_class
        assert ds.image_size == 32
        assert np.array_equal(np.bincount(ds.targets), np.full(100, per_class))
        assert ds.load_pil(len(ds) - 1).size == (32, 32)
    assert sub100_train.classes == sub100_val.classes
    assert sub100_train.class_names[0].startswith("goldfish")   # from the zip's classes.tsv


def test_imagenetsub_keeps_first_100_sorted_classes(tin200_zip, sub100_train) -> None:
    full = open_dataset(str(tin200_zip), "val")
    sub = open_dataset(str(tin200_zip), "val", imagenetsub=True)
    assert len(full.classes) == 200
    assert sub.classes == full.classes[:100] == sub100_train.classes
    assert len(sub) == 5000 and sub.targets.max() == 99
    assert sub.files == full.files[:5000]   # class-major order: the first 100 classes come first


def test_classes_selects_a_range_of_the_sorted_classes(tin200_zip, sub100_train) -> None:
    """--classes 101-200 is the second hundred in sorted wnid order, relabelled 0..99, disjoint from
    sub100; 1-100 is --imagenetsub; the selection is in the name and in the cache identity."""
    full = open_dataset(str(tin200_zip), "val")
    second = open_dataset(str(tin200_zip), "val", classes="101-200")
    assert second.classes == full.classes[100:] and not set(second.classes) & set(sub100_train.classes)
    assert second.class_names == full.class_names[100:]
    assert len(second) == 5000 and np.array_equal(second.targets, full.targets[5000:] - 100)
    assert second.files == full.files[5000:]
    assert second.name == "tiny-imagenet-32-classes101-200"
    first = open_dataset(str(tin200_zip), "val", classes="1-100")
    assert first.classes == open_dataset(str(tin200_zip), "val", imagenetsub=True).classes
    assert len({full.identity(), second.identity(), first.identity()}) == 3
    assert open_dataset(str(tin200_zip), "val", classes=" 101 - 200 ").identity() == second.identity()


@pytest.mark.parametrize("classes, message", [
    ("101:200", r"--classes '101:200': write FIRST-LAST, positions in the sorted class order counted from 1"),
    ("0-10", r"--classes '0-10': write FIRST-LAST"),
    ("20-10", r"--classes '20-10': write FIRST-LAST"),
    ("2-4", r"--classes 2-4 reaches class 4, but .*tiny/train/ has 3 classes; choose a range within 1-3"),
])
def test_a_bad_class_range_is_refused_with_the_fix(tiny_folder, classes: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_dataset(str(tiny_folder), classes=classes)


def test_a_class_range_needs_imagenet_layout_data_and_excludes_imagenetsub(tiny_folder) -> None:
    assert open_dataset(str(tiny_folder), classes="2-3").classes == ["class_1", "class_2"]
    with pytest.raises(ConfigError, match=r"--imagenetsub and --classes 1-2 both choose the classes; keep one"):
        open_dataset(str(tiny_folder), imagenetsub=True, classes="1-2")
    with pytest.raises(ConfigError, match=r"the demo datasets are not: drop --classes 1-2"):
        open_dataset("demo", classes="1-2")
    with pytest.raises(ConfigError, match=r"--classes 1-2 both choose"):
        TrainConfig(data="demo", imagenetsub=True, classes="1-2").validate()


@pytest.mark.slow
def test_sub100_cache_builds_once_and_reloads_fast(sub100_train, tmp_cache_dir, monkeypatch) -> None:
    """The full 50,000-image cache (built by the process pool, or by another test process of this
    run) equals direct decoding, and the second load reads the file without decoding anything."""
    start = time.perf_counter()
    images = load_uint8(sub100_train, cache_dir=tmp_cache_dir, progress=False)
    first = time.perf_counter() - start
    assert images.shape == (50_000, 32, 32, 3) and images.dtype == np.uint8
    probe = np.random.RandomState(0).choice(len(sub100_train), 25, replace=False)
    assert np.array_equal(images[probe], _decoded(sub100_train, probe))
    _forbid_decoding(monkeypatch)
    start = time.perf_counter()
    again = load_uint8(sub100_train, cache_dir=tmp_cache_dir, progress=False)
    reload = time.perf_counter() - start
    print(f"sub100 train cache: first load {first:.1f} s, reload {reload:.2f} s")
    assert np.array_equal(again, images)
    assert reload < 5.0, f"reloading the cache took {reload:.1f} s"
    subset = load_uint8(sub100_train, cache_dir=tmp_cache_dir, progress=False, ids=probe[::-1])
    assert np.array_equal(subset, images[probe[::-1]])


def test_zip_and_extracted_folder_load_identically(sub100_zip, tmp_path) -> None:
    """A few real classes, extracted to a folder and re-zipped: same classes, ids, labels, pixels."""
    folder = tmp_path / "sub"
    with zipfile.ZipFile(sub100_zip) as source:
        names = source.namelist()
        top = names[0].split("/", 1)[0]
        classes = sorted({n.split("/")[2] for n in names if n.startswith(f"{top}/train/")})[:3]
        for split, per_class in (("train", 4), ("val", 2)):
            for cls in classes:
                members = sorted(n for n in names if n.startswith(f"{top}/{split}/{cls}/"))[:per_class]
                for member in members:
                    target = folder / member.split("/", 1)[1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(source.read(member))
    archive = _zip_folder(folder, tmp_path / "sub.zip", top="sub")
    for split in ("train", "val"):
        from_folder = open_dataset(str(folder), split)
        from_zip = open_dataset(str(archive), split)
        assert (from_folder.kind, from_zip.kind) == ("imagefolder", "zip")
        assert from_folder.classes == from_zip.classes == classes
        assert from_folder.files == from_zip.files
        assert np.array_equal(from_folder.targets, from_zip.targets)
        pixels = load_uint8(from_folder, cache_dir=tmp_path / "cache", progress=False)
        assert np.array_equal(pixels, load_uint8(from_zip, cache_dir=tmp_path / "cache", progress=False))
        assert np.array_equal(pixels, _decoded(from_zip))


# ----------------------------------------------------------------------------- zip specifics
@pytest.mark.parametrize("top", [None, "data"])
def test_zip_layouts_top_level_or_single_folder(tiny_folder, tmp_path, top) -> None:
    archive = _zip_folder(tiny_folder, tmp_path / "t.zip", top=top, dir_entries=True)
    ds = open_dataset(str(archive), "val")
    reference = open_dataset(str(tiny_folder), "val")
    assert ds.files == reference.files and ds.classes == reference.classes
    assert np.array_equal(_decoded(ds), _decoded(reference))


def test_zip_dataset_pickles_and_reopens_after_fork(tiny_folder, tmp_path) -> None:
    ds = open_dataset(str(_zip_folder(tiny_folder, tmp_path / "t.zip", top="t")), "train")
    expected = _decoded(ds)                  # the parent now holds an open handle
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handle is None
    assert np.array_equal(_decoded(clone), expected)
    # Forked workers inherit the parent's dataset object, open handle included (nothing pickled).
    with multiprocessing.get_context("fork").Pool(2, initializer=_inherit, initargs=(ds,)) as pool:
        rows = pool.map(_decode_inherited, range(len(ds)))
    assert np.array_equal(np.stack([pixels for pixels, _ in rows]), expected)
    assert all(handle_pid not in (os.getpid(), -1) for _, handle_pid in rows)   # each reopened its own


_inherited = {}


def _inherit(ds) -> None:
    _inherited["ds"] = ds


def _decode_inherited(i: int) -> tuple[np.ndarray, int]:
    ds = _inherited["ds"]
    return np.asarray(ds.load_pil(i)), ds._pid


# ----------------------------------------------------------------------------- the cache
def test_cache_round_trips_and_is_reused(tiny_folder, tmp_path, monkeypatch) -> None:
    ds = open_dataset(str(tiny_folder), "train")
    cache_dir = tmp_path / "cache"
    images = load_uint8(ds, cache_dir=cache_dir, progress=False)
    assert np.array_equal(images, _decoded(ds))
    assert cache_path(ds, cache_dir).is_file()
    assert [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name] == []   # no leftovers
    _forbid_decoding(monkeypatch)
    assert np.array_equal(load_uint8(ds, cache_dir=cache_dir, progress=False), images)
    ids = np.array([7, 0, 11, 7])
    assert np.array_equal(load_uint8(ds, cache_dir=cache_dir, progress=False, ids=ids), images[ids])


def test_concurrent_builders_agree(tiny_folder, tmp_path) -> None:
    """Two processes asking for the same cache at once both get it, and one file results."""
    ds = open_dataset(str(tiny_folder), "train")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        first, second = pool.starmap(load_uint8, [(ds, tmp_path / "cache", False)] * 2)
    assert np.array_equal(first, _decoded(ds)) and np.array_equal(second, first)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".lock", ".npy"]


def test_ids_without_cache_decode_only_those(tiny_folder, tmp_path) -> None:
    ds = open_dataset(str(tiny_folder), "train")
    ids = np.array([5, 2, 9, 2, 5])                      # 3 distinct of 12: decode just those
    subset = load_uint8(ds, cache_dir=tmp_path / "cache", progress=False, ids=ids)
    assert np.array_equal(subset, _decoded(ds, ids))
    assert not cache_path(ds, tmp_path / "cache").exists()
    most = np.arange(11, 4, -1)                          # 7 of 12: worth building the full cache
    assert np.array_equal(load_uint8(ds, cache_dir=tmp_path / "cache", progress=False, ids=most),
                          _decoded(ds, most))
    assert cache_path(ds, tmp_path / "cache").is_file()


def test_cache_key_changes_with_the_source(tiny_folder, tmp_path) -> None:
    before = open_dataset(str(tiny_folder), "train")
    load_uint8(before, cache_dir=tmp_path, progress=False)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tiny_folder / "train" / "class_0" / "img_9.png")
    after = open_dataset(str(tiny_folder), "train")
    assert cache_path(after, tmp_path) != cache_path(before, tmp_path)
    assert np.array_equal(load_uint8(after, cache_dir=tmp_path, progress=False), _decoded(after))


def test_damaged_cache_is_rebuilt(tiny_folder, tmp_path) -> None:
    ds = open_dataset(str(tiny_folder), "train")
    images = load_uint8(ds, cache_dir=tmp_path, progress=False)
    path = cache_path(ds, tmp_path)
    path.write_bytes(path.read_bytes()[:200])          # truncated, as after a crash mid-copy
    with pytest.warns(UserWarning, match="rebuilding"):
        assert np.array_equal(load_uint8(ds, cache_dir=tmp_path, progress=False), images)


def test_process_pool_builder_matches_serial(tmp_path, monkeypatch) -> None:
    """The pool path (used above 16k images) on a small folder, chunks of 5 over 2 workers."""
    folder = write_image_folder(tmp_path / "pool", n_classes=4, per_class=6, splits=("train",))
    ds = open_dataset(str(folder), "train")
    monkeypatch.setattr(cache_module, "_POOL_MIN", 0)
    monkeypatch.setattr(cache_module, "_CHUNK", 5)
    monkeypatch.setattr(cache_module, "_worker_count", lambda: 2)
    assert np.array_equal(load_uint8(ds, cache_dir=tmp_path / "cache", progress=False), _decoded(ds))


def test_default_cache_dir_follows_environment(tiny_folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CCLNB_CACHE", str(tmp_path / "env-cache"))
    ds = open_dataset(str(tiny_folder), "val")
    load_uint8(ds, progress=False)
    assert cache_path(ds).parent == tmp_path / "env-cache" and cache_path(ds).is_file()


# ----------------------------------------------------------------------------- demo and CIFAR
def test_demo_dataset(demo_train, demo_val) -> None:
    """`--data demo`: the shapes, drawn by code, identical bytes on every machine."""
    assert (demo_train.name, demo_train.kind, demo_train.image_size) == ("demo-shapes", "demo", 32)
    assert (len(demo_train), len(demo_val)) == (2000, 600)
    assert demo_train.classes == list(SHAPES_CLASSES)
    assert np.bincount(demo_train.targets).tolist() == [200] * 10 and np.bincount(demo_val.targets).tolist() == [60] * 10
    images = load_uint8(demo_train, progress=False)
    assert images.shape == (2000, 32, 32, 3) and images.dtype == np.uint8
    # the pinned bytes: a change of the drawing code changes every demo number, so it must be deliberate
    digest = hashlib.sha256(images.tobytes() + load_uint8(demo_val, progress=False).tobytes()).hexdigest()
    assert digest == DEMO_SHAPES_SHA256
    grey = images.reshape(len(images), -1, 3).astype(np.float64)
    assert (grey.max(axis=1) - grey.min(axis=1)).min(axis=1).min() > 40   # every image shows its form
    assert np.array_equal(np.asarray(demo_train.load_pil(3)), images[3])


def test_the_shapes_build_in_well_under_a_second_per_class() -> None:
    """The set is drawn at first use in every process (each notebook's kernel): it must stay cheap."""
    tic = time.perf_counter()
    drawn = draw_class("ring", 260, np.random.RandomState(0))
    assert drawn.shape == (260, 32, 32, 3) and time.perf_counter() - tic < 1.0


def test_the_digits_stay_available() -> None:
    """`--data demo-digits`: the earlier demo data, kept for comparison (random features score ~80% kNN)."""
    train, val = open_dataset("demo-digits", "train"), open_dataset("demo-digits", "val")
    assert (train.name, train.kind, train.image_size) == ("demo-digits", "demo", 32)
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.classes == [str(d) for d in range(10)]
    val_share = np.bincount(val.targets) / (np.bincount(train.targets) + np.bincount(val.targets))
    assert np.all(np.abs(val_share - 0.2) < 0.02)                       # stratified
    assert np.array_equal(train.images, open_dataset("demo-digits", "train").images)    # deterministic


def _write_cifar(root: Path, kind: str, n_per_file: int = 6) -> np.ndarray:
    """A miniature CIFAR pickle folder (same format as the real one); returns the train pixels."""
    rng = np.random.RandomState(1)
    if kind == "cifar10":
        folder, train, val, meta = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            ["test_batch"], {"label_names": [f"c{i}" for i in range(10)]}
        label_key, meta_name = "labels", "batches.meta"
    else:
        folder, train, val, meta = root / "cifar-100-python", ["train"], ["test"], \
            {"fine_label_names": [f"f{i}" for i in range(100)]}
        label_key, meta_name = "fine_labels", "meta"
    folder.mkdir(parents=True)
    train_pixels = []
    for name in train + val:
        data = rng.randint(0, 256, size=(n_per_file, 3072), dtype=np.uint8)
        labels = list(rng.randint(0, 10, size=n_per_file))
        (folder / name).write_bytes(pickle.dumps({"data": data, label_key: labels}))
        if name in train:
            train_pixels.append(data)
    (folder / meta_name).write_bytes(pickle.dumps(meta))
    return np.concatenate(train_pixels).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_pickle_folders(tmp_path, kind) -> None:
    expected = _write_cifar(tmp_path, kind)
    ds = open_dataset(str(tmp_path), "train")                  # the parent folder, auto-detected
    assert (ds.kind, ds.image_size, len(ds.classes)) == (kind, 32, 10 if kind == "cifar10" else 100)
    assert np.array_equal(load_uint8(ds, progress=False), expected)
    inner = next(tmp_path.iterdir())
    val = open_dataset(str(inner), "val", kind=kind)            # the pickle folder itself
    assert len(val) == 6


def test_cifar_absent_offline_says_where_and_how(tmp_path, monkeypatch) -> None:
    with pytest.raises(DataError, match=r"no cifar100 data at .*--download"):
        open_dataset(str(tmp_path / "nothing"), kind="cifar100")

    def offline(*_args, **_kwargs):
        raise OSError("Temporary failure in name resolution")
    # A stand-in torchvision whose downloader fails as it does offline (and costs no import time).
    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=offline, CIFAR100=offline)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    with pytest.raises(DataError, match=r"downloading cifar10 into .* failed .*Offline\? Fetch"):
        open_dataset(str(tmp_path / "c10"), kind="cifar10", download=True)


# ----------------------------------------------------------------------------- bad input
def test_missing_path() -> None:
    with pytest.raises(DataError, match=r"dataset path .*no/such/place does not exist; check --data"):
        open_dataset("/no/such/place")


def test_no_data_given() -> None:
    with pytest.raises(ConfigError, match="--data"):
        open_dataset(None)


def test_folder_without_train(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"has no 'train/' folder \(found: images\)"):
        open_dataset(str(tmp_path))


def test_zip_without_train(tiny_folder, tmp_path) -> None:
    archive = _zip_folder(tiny_folder / "val", tmp_path / "flat.zip", top=None)
    with pytest.raises(DataError, match=r"zip archive .*flat.zip has no 'train/' folder"):
        open_dataset(str(archive))


def test_missing_val_split(tmp_path) -> None:
    folder = write_image_folder(tmp_path / "d", splits=("train",))
    with pytest.raises(DataError, match="no 'val/' folder"):
        open_dataset(str(folder), "val")


def test_empty_class_folder(tiny_folder, tmp_path) -> None:
    (tiny_folder / "train" / "class_9").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/class_9/ holds no images"):
        open_dataset(str(tiny_folder))
    archive = _zip_folder(tiny_folder, tmp_path / "t.zip", top=None, dir_entries=True)
    with pytest.raises(DataError, match=r"class folder .*train/class_9/ holds no images"):
        open_dataset(str(archive))


def test_corrupt_jpeg_is_named(tmp_path) -> None:
    folder = write_image_folder(tmp_path / "d", n_classes=2, per_class=20, ext=".jpg", splits=("train",))
    victim = folder / "train" / "class_1" / "img_13.jpg"     # id 25: not one of the size probes
    victim.write_bytes(victim.read_bytes()[:300])            # truncated: header fine, data cut
    ds = open_dataset(str(folder))
    victim_id = ds.files.index("class_1/img_13.jpg")
    with pytest.raises(DataError, match=r"cannot decode image .*class_1/img_13\.jpg"):
        ds.load_pil(victim_id)
    with pytest.raises(DataError, match=r"cannot decode image .*class_1/img_13\.jpg"):
        load_uint8(ds, cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").glob("*.npy")) == []   # no half-built cache left behind
    (folder / "train" / "class_0" / "img_0.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"class_0/img_0\.jpg"):
        open_dataset(str(folder))


def test_unequal_image_sizes_refuse_the_cache(tmp_path) -> None:
    folder = write_image_folder(tmp_path / "d", n_classes=2, per_class=10, splits=("train",))
    odd = folder / "train" / "class_0" / "img_1.png"          # id 1: not one of the size probes
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(odd)
    ds = open_dataset(str(folder))
    assert ds.image_size == 32                                 # the probe cannot see it ...
    with pytest.raises(DataError, match=r"img_1\.png is 40x40 .*equal-size"):
        load_uint8(ds, cache_dir=tmp_path / "cache", progress=False)   # ... the builder does
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "train" / "class_0" / "img_0.png")
    mixed = open_dataset(str(folder))
    assert mixed.image_size is None
    with pytest.raises(DataError, match="equal-size"):
        load_uint8(mixed, progress=False)


def test_bad_arguments(tiny_folder, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"--imagenetsub keeps the first 100 classes, but .* has only 3"):
        open_dataset(str(tiny_folder), imagenetsub=True)
    with pytest.raises(ConfigError, match="unknown dataset kind 'tar'"):
        open_dataset(str(tiny_folder), kind="tar")
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        open_dataset(str(tiny_folder), split="test")
    not_zip = tmp_path / "data.txt"
    not_zip.write_text("hello")
    with pytest.raises(DataError, match="is a file but not a zip archive"):
        open_dataset(str(not_zip))
    ds = open_dataset(str(tiny_folder))
    with pytest.raises(ConfigError, match=r"sample ids must lie in \[0, 12\)"):
        load_uint8(ds, progress=False, ids=np.array([3, 12]))


def test_subset_per_class_takes_the_first_ids() -> None:
    targets = np.array([2, 0, 2, 1, 0, 2, 0, 1])
    assert subset_per_class(targets, 2).tolist() == [0, 1, 2, 3, 4, 7]
    assert subset_per_class(targets, 10).tolist() == list(range(8))
    with pytest.raises(ConfigError, match="n >= 1"):
        subset_per_class(targets, 0)


# ----------------------------------------------------------------------------- the CLI
def test_cli_data_info(tiny_folder, capsys) -> None:
    assert cli.main(["data", "info", str(tiny_folder), "--n-tasks", "3"]) == 0
    out = capsys.readouterr().out
    assert "kind:        imagefolder" in out and "train:       12 images" in out
    assert "image size:  32x32" in out and "task 2:" in out
    assert cli.main(["data", "info", str(tiny_folder), "--n-tasks", "2"]) == ConfigError.exit_code
    assert "3 classes cannot be split into 2 equal tasks" in capsys.readouterr().err


def test_cli_data_cache(tiny_folder, tmp_path, capsys) -> None:
    assert cli.main(["data", "cache", str(tiny_folder), "--cache-dir", str(tmp_path)]) == 0
    assert cli.main(["data", "cache", str(tiny_folder), "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train: 12 images 32x32, built ") and out[2].startswith("train: 12 images 32x32, loaded from ")
    assert cli.main(["data", "cache", "/no/such/place"]) == DataError.exit_code


def test_the_data_identity_names_what_was_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a run's record says it read (`cclnb.data.fingerprint`): an embedded set's name and
    version; a zip's file name, size and SHA-256, hashed once per version of the file (cached
    beside the uint8 cache) and again when the file changes; a folder's image count and listing."""
    from cclnb.data import fingerprint

    assert fingerprint.data_identity(open_dataset("demo", "train")) == {
        "kind": "demo", "name": "demo-shapes", "version": "v2"}
    folder = write_image_folder(tmp_path / "set", n_classes=2, per_class=3)
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder).as_posix())
    cache = tmp_path / "cache"
    identity = fingerprint.data_identity(open_dataset(str(archive), "train"), cache)
    assert identity == {"kind": "zip", "file": "set.zip", "bytes": archive.stat().st_size,
                        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    # hashed once: the next call reads the cached hash (planted here to prove it is read) ...
    (cached,) = cache.glob("set.zip-*.sha256")
    cached.write_text("0" * 64)
    assert fingerprint.data_identity(open_dataset(str(archive), "train"), cache)["sha256"] == "0" * 64
    # ... until the file changes
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("notes.txt", "more")
    assert fingerprint.data_identity(open_dataset(str(archive), "train"), cache)["sha256"] == (
        hashlib.sha256(archive.read_bytes()).hexdigest())
    listing = fingerprint.data_identity(open_dataset(str(folder), "train"))
    assert listing["kind"] == "imagefolder" and listing["folder"] == "set" and listing["images"] == 6
    assert len(listing["listing_sha256"]) == 64
