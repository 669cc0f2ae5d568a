"""ImageNet-layout datasets (`<root>/<split>/<class>/<image>`) from a folder or a zip archive.

Both list files the way torchvision's ImageFolder does (class index = sorted class folder name,
files sorted within a class, image extensions only, nested folders included), so a sample id
means the same image whichever form the data arrives in. A zip is read member by member on
demand, never extracted: each process opens its own handle (a zipfile handle shared across a
fork would interleave seeks), which is what makes the dataset safe in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from cclnb.data.base import IMG_EXTENSIONS, ImageDataset, decode_image, is_image_file
from cclnb.config import parse_class_range
from cclnb.data.selection import select_classes, selection_suffix
from cclnb.errors import DataError

_SIZE_PROBES = 8            # images whose header is read to guess `image_size`
_ZIP_JUNK = "__MACOSX/"     # resource forks macOS adds to zips


def _sort_key(relative: str) -> tuple[str, str]:
    """ImageFolder's order: by folder, then by file name inside it."""
    folder, _, name = relative.rpartition("/")
    return folder, name


def _range_key(class_range: str | None) -> str:
    """The class range's part of a dataset's identity (empty without one: old cache keys hold)."""
    return "|classes={}-{}".format(*parse_class_range(class_range)) if class_range is not None else ""


def _parse_classes_tsv(text: str) -> dict[str, str]:
    """`wnid<TAB>name` lines -> {wnid: name}; lines without a tab are ignored."""
    names = {}
    for line in text.splitlines():
        if "\t" in line:
            wnid, name = line.split("\t", 1)
            names[wnid.strip()] = name.strip()
    return names


class FileDataset(ImageDataset):
    """A dataset of encoded image files; subclasses say how to read one file's bytes."""

    def __init__(self, *, name: str, kind: str, split: str, location: str,
                 class_files: dict[str, list[str]], class_descriptions: dict[str, str],
                 imagenetsub: bool, class_range: str | None) -> None:
        self.name, self.kind, self.split = name, kind, split
        self.location = location
        self.imagenetsub, self.class_range = imagenetsub, class_range
        classes = sorted(class_files)
        if not classes:
            raise DataError(f"{location}/{split}/ holds no class folders; expected "
                            f"{split}/<class>/<image> with image extensions {', '.join(IMG_EXTENSIONS)}")
        for cls in classes:
            if not class_files[cls]:
                raise DataError(f"class folder {location}/{split}/{cls}/ holds no images (looked for "
                                f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
        classes = select_classes(classes, imagenetsub, class_range, f"{location}/{split}/")
        self.classes = classes
        self.class_names = [class_descriptions.get(cls, cls) for cls in classes]
        self.files: list[str] = []
        targets: list[int] = []
        for index, cls in enumerate(classes):
            members = sorted(class_files[cls], key=_sort_key)
            self.files.extend(members)
            targets.extend([index] * len(members))
        self.targets = np.asarray(targets, dtype=np.int64)
        self.image_size = self._probe_image_size()

    def _read(self, i: int) -> bytes:
        """The encoded bytes of sample `i`."""
        raise NotImplementedError

    def read_bytes(self, i: int) -> bytes:
        """The encoded file of sample `i`, undecoded (the device decoder's input, `cclnb.data.jpeg`)."""
        return self._read(i)

    def describe(self, i: int) -> str:
        return f"{self.location}/{self.files[i]}"

    def load_pil(self, i: int) -> Image.Image:
        return decode_image(self._read(i), self.describe(i))

    def _probe_image_size(self) -> int | None:
        """Guess the common side length from a few evenly spaced headers (cheap: no decoding).

        A probe, not a proof: `load_uint8` checks every image it decodes and stops with an error
        on the first one whose size differs.
        """
        probes = np.unique(np.linspace(0, len(self.files) - 1, _SIZE_PROBES).astype(int))
        sizes = set()
        for i in probes:
            try:
                with Image.open(io.BytesIO(self._read(int(i)))) as image:
                    sizes.add(image.size)
            except (OSError, SyntaxError, ValueError) as error:
                raise DataError(f"cannot read image {self.describe(int(i))}: {error}. The file is "
                                f"corrupt or not an image; replace it or delete it.") from error
        if len(sizes) == 1:
            width, height = sizes.pop()
            if width == height:
                return int(width)
        return None


class FolderDataset(FileDataset):
    """`<root>/<split>/<class>/<image>` on disk."""

    def __init__(self, root: str | os.PathLike, split: str = "train", imagenetsub: bool = False,
                 class_range: str | None = None) -> None:
        self.root = Path(root).resolve()
        split_dir = self.root / split
        if not split_dir.is_dir():
            found = sorted(p.name for p in self.root.iterdir())[:10] if self.root.is_dir() else []
            raise DataError(f"{self.root} has no '{split}/' folder (found: {', '.join(found) or 'nothing'}); "
                            f"expected the ImageNet layout <root>/{split}/<class>/<image>")
        class_files: dict[str, list[str]] = {}
        dir_mtimes = [split_dir.stat().st_mtime_ns]
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            files = []
            for folder, _, names in os.walk(entry.path, followlinks=True):
                dir_mtimes.append(os.stat(folder).st_mtime_ns)
                rel_folder = Path(folder).relative_to(split_dir).as_posix()
                files.extend(f"{rel_folder}/{n}" for n in names if is_image_file(n))
            class_files[entry.name] = files
        tsv = self.root / "classes.tsv"
        descriptions = _parse_classes_tsv(tsv.read_text(encoding="utf-8")) if tsv.is_file() else {}
        super().__init__(name=self.root.name + selection_suffix(imagenetsub, class_range), kind="imagefolder",
                         split=split, location=str(self.root), class_files=class_files,
                         class_descriptions=descriptions, imagenetsub=imagenetsub, class_range=class_range)
        # Folder mtimes change when files are added, removed or renamed; with the file list they
        # key the cache (an image rewritten in place keeps both: delete the cache file then).
        listing = hashlib.sha256("\n".join(self.files).encode()).hexdigest()[:16]
        self._identity = (f"imagefolder|{self.root}|{split}|sub={imagenetsub}{_range_key(class_range)}|n={len(self.files)}|"
                          f"files={listing}|mtime={max(dir_mtimes)}")

    def _read(self, i: int) -> bytes:
        path = self.root / self.split / self.files[i]
        try:
            return path.read_bytes()
        except OSError as error:
            raise DataError(f"cannot read {path}: {error}") from error

    def describe(self, i: int) -> str:
        return str(self.root / self.split / self.files[i])

    def identity(self) -> str:
        return self._identity


class ZipDataset(FileDataset):
    """A zip archive of the ImageNet layout, at its top level or inside one top folder."""

    def __init__(self, path: str | os.PathLike, split: str = "train", imagenetsub: bool = False,
                 class_range: str | None = None) -> None:
        self.path = Path(path).resolve()
        self._handle: zipfile.ZipFile | None = None
        self._pid = -1
        try:
            names = [n for n in self._zip().namelist() if not n.startswith(_ZIP_JUNK)]
        except (OSError, zipfile.BadZipFile) as error:
            raise DataError(f"cannot open zip archive {self.path}: {error}; re-download or re-pack it") from error
        self.prefix = self._find_prefix(names, split)
        split_prefix = f"{self.prefix}{split}/"
        class_files: dict[str, list[str]] = {}
        for name in names:
            if not name.startswith(split_prefix):
                continue
            parts = name[len(split_prefix):].split("/", 1)
            if len(parts) < 2:       # a file directly in <split>/: not in a class folder
                continue
            files = class_files.setdefault(parts[0], [])
            if is_image_file(parts[1]):
                files.append(name[len(split_prefix):])
        tsv_name = f"{self.prefix}classes.tsv"
        descriptions = (_parse_classes_tsv(self._zip().read(tsv_name).decode("utf-8"))
                        if tsv_name in names else {})
        stem = self.prefix.rstrip("/") or self.path.stem
        super().__init__(name=stem + selection_suffix(imagenetsub, class_range), kind="zip", split=split,
                         location=f"{self.path}:{self.prefix.rstrip('/')}".rstrip(":"),
                         class_files=class_files, class_descriptions=descriptions, imagenetsub=imagenetsub,
                         class_range=class_range)
        stat = self.path.stat()
        self._identity = (f"zip|{self.path}|{split}|sub={imagenetsub}{_range_key(class_range)}|size={stat.st_size}|"
                          f"mtime={stat.st_mtime_ns}")

    def _find_prefix(self, names: Iterable[str], split: str) -> str:
        """"" when `<split>/` is at the top of the zip, "<top>/" when it sits in one top folder."""
        names = list(names)
        tops = {n.split("/", 1)[0] for n in names if "/" in n}
        candidates = [""] + ([f"{tops.pop()}/"] if len(tops) == 1 else [])
        for prefix in candidates:
            if any(n.startswith(f"{prefix}{split}/") for n in names):
                return prefix
        found = ", ".join(sorted({n.split("/", 1)[0] for n in names})[:10]) or "nothing"
        raise DataError(f"zip archive {self.path} has no '{split}/' folder at its top level or inside a "
                        f"single top folder (top level holds: {found}); expected "
                        f"[<top>/]{split}/<class>/<image>")

    def _zip(self) -> zipfile.ZipFile:
        """This process's handle: reopened after a fork or in a fresh DataLoader worker."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, -1   # handles do not travel between processes
        return state

    def _read(self, i: int) -> bytes:
        member = f"{self.prefix}{self.split}/{self.files[i]}"
        try:
            return self._zip().read(member)
        except (OSError, zipfile.BadZipFile, KeyError) as error:
            raise DataError(f"cannot read {self.path}:{member}: {error}; the archive may be damaged "
                            f"or changed since it was opened") from error

    def describe(self, i: int) -> str:
        return f"{self.path}:{self.prefix}{self.split}/{self.files[i]}"

    def identity(self) -> str:
        return self._identity
