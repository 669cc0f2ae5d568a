"""A dataset's identity: which data a run actually read, for its config.json and its record.

Why: a run's config says what was *asked* (`data`, `dataset`), not what was read. The demo preset
(`dataset=demo`, the embedded shapes) once trained a whole study with `-p data=/nonexistent.zip`
and every record said it used that zip. The identity names the data itself: an embedded set's
name and version; a zip archive's file name, size and SHA-256; a folder's image count and a hash
of its file listing (hashing every image of an ImageNet folder would cost minutes); CIFAR's kind
and image count. A zip is hashed once per version of the file (path, size, mtime): the hash is
cached beside the uint8 cache (`cclnb.data.cache`), so only a run's first start on a machine pays
the read (about a second per 100 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any

from cclnb.data.base import ImageDataset
from cclnb.data.cache import default_cache_dir
from cclnb.data.folder import FolderDataset, ZipDataset

_HEX64 = re.compile(r"[0-9a-f]{64}")


def data_identity(ds: ImageDataset, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What `ds` (the train split a run reads) is, as plain JSON values; `cache_dir` (default the
    uint8 cache's) keeps a zip's hash."""
    if ds.kind == "demo":
        name, version, _split = ds.identity().split("|")   # "<name>|<version>|<split>" (shapes.py, demo.py)
        return {"kind": "demo", "name": name, "version": version}
    if isinstance(ds, ZipDataset):
        return {"kind": "zip", "file": ds.path.name, "bytes": ds.path.stat().st_size,
                "sha256": file_sha256(ds.path, cache_dir)}
    if isinstance(ds, FolderDataset):
        return {"kind": "imagefolder", "folder": ds.root.name, "images": len(ds),
                "listing_sha256": hashlib.sha256("\n".join(ds.files).encode()).hexdigest()}
    return {"kind": ds.kind, "name": ds.name, "images": len(ds)}


def file_sha256(path: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """The SHA-256 of the file at `path`, read from the cache when this version of the file (path,
    size, mtime) was hashed before; a cache that cannot be written only costs the next call a read."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = Path(cache_dir or default_cache_dir()) / f"{path.name}-{key}.sha256"
    if cached.is_file():
        text = cached.read_text(encoding="ascii", errors="replace").strip()
        if _HEX64.fullmatch(text):
            return text
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(value + "\n", encoding="ascii")
        os.replace(tmp, cached)       # a reader sees no hash or the whole hash
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return value
