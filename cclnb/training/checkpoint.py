"""Checkpoints that survive a killed job and load without executing code.

* Atomic: the state goes to a temporary file in the same folder, is flushed and fsynced, and only
  then renamed over the old file (then the folder is fsynced, so the rename itself is durable). A
  kill or a full disk at any moment leaves either the old complete file or the new complete file.
* Safe to load: only tensors, numbers, strings, None, lists, tuples and dicts go in (checked when
  saving), so `torch.load(weights_only=True)` reads it back and a downloaded file cannot run code.
* Recognisable: every file carries `"format": FORMAT`; anything else is refused by name.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cclnb.errors import CheckpointError, ConfigError

FORMAT = "cclnb-checkpoint-v1"
_ATOMS = (bool, int, float, str, type(None))  # exact types: numpy scalars subclass float but do not load


def _check_loadable(obj: Any, where: str) -> None:
    """Refuse, before writing, anything `weights_only=True` could not load back."""
    if isinstance(obj, torch.Tensor) or type(obj) in _ATOMS:
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_loadable(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"checkpoint key {where}[{key!r}] is a {type(key).__name__}; "
                                      "use str or int keys")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    raise CheckpointError(f"checkpoint entry {where} is a {type(obj).__name__}, which "
                          "torch.load(weights_only=True) cannot read; convert it to a tensor, list or "
                          "number before saving (numpy arrays: torch.from_numpy or .tolist())")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable. Not every OS lets a folder be opened (Windows): skip."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_bytes(folder: Path) -> int | None:
    """Free space where `folder` lives, or None when it cannot be read."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _replace_atomically(dst: Path, fill: Callable[[Path], None], what: str) -> None:
    """`fill(tmp)` a temporary file beside `dst`, then rename it over `dst` and fsync the folder.

    On any failure the previous `dst` is untouched, the temporary file is removed, and a
    CheckpointError names the file, the cause and the free space. A full disk matters most: torch's
    zip writer reports it only as "unexpected pos ..." (a RuntimeError), which says nothing to a reader.
    """
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    existed = dst.exists()
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fill(tmp)
        os.replace(tmp, dst)
        _fsync_folder(dst.parent)
    except (OSError, RuntimeError) as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        free = _free_bytes(dst.parent) if dst.parent.exists() else None
        space = f"{free / 2**20:.0f} MiB free there" if free is not None else "free space unknown"
        raise CheckpointError(f"could not write {what} {dst}: {cause} ({space}); free disk space or "
                              f"choose a writable --run-dir "
                              f"({'the previous file is intact' if existed else 'nothing was written'})") from e
    finally:
        with contextlib.suppress(OSError):  # gone already, or its folder never existed
            tmp.unlink(missing_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.*.tmp"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)


def write_atomically(payload: Any, path: str | os.PathLike, what: str = "checkpoint") -> None:
    """`torch.save(payload)` to `path`, flushed and fsynced, through `_replace_atomically`."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())

    _replace_atomically(Path(path), save, what)


def publish_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` an atomic copy of the complete file `src` without serializing it again: a hard
    link (no bytes written: a task's end would otherwise write the same 135-180 MB state twice,
    as task_<t>.pt and last.pt), or a byte copy where the file system has no hard links.
    Replacing `dst` later (the next save) breaks the link and leaves `src` as it is."""
    def link_or_copy(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    _replace_atomically(Path(dst), link_or_copy, f"checkpoint (from {src})")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` (plus `"format": FORMAT`) to `path` atomically; creates the folder.

    Checked first, so a state `torch.load(weights_only=True)` could not read is never written.
    """
    payload = {**state, "format": FORMAT}
    _check_loadable(payload, "state")
    write_atomically(payload, path)


def _torch_load(path: Path, map_location: Any, allow_numpy: bool = False) -> Any:
    """`torch.load(weights_only=True)` with every failure turned into a CheckpointError.

    `allow_numpy` additionally admits numpy arrays (the authors' checkpoints store their replay
    lists as arrays of file names); numpy arrays are plain data, so this stays code-free.
    """
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; check the path (a run keeps them in "
                              "<run-dir>/checkpoints/) or start without --resume")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass a file such as "
                              f"{path / 'last.pt'}")
    allowed = _numpy_globals() if allow_numpy else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(f"{path} is not a cclnb checkpoint: it is corrupt or holds objects other than "
                              f"tensors and plain data, and was not loaded {reason[:160]}; "
                              "pass a checkpoint written by cclnb") from e
    except Exception as e:  # truncated zip, random bytes, empty file, ...
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); "
                              "delete it and resume from an earlier checkpoint (checkpoints/task_<t>.pt) "
                              "or rerun the run") from e


def _numpy_globals() -> list[Any]:
    """The numpy names a pickled array refers to, under numpy 2's and numpy 1's module paths."""
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            *(type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUV")]


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; any other file is a CheckpointError."""
    path = Path(path)
    state = _torch_load(path, map_location)
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a cclnb checkpoint (no 'format' entry); pass a file from "
                              "<run-dir>/checkpoints/ (the authors' checkpoints only serve for linear "
                              "evaluation, through backbone_state_dict)")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path} has format {state['format']!r}, this cclnb reads {FORMAT!r}; "
                              "use the cclnb version that wrote it")
    return state


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from, in a form `weights_only=True` can load."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured. CUDA states are restored for the devices present."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix`, with it removed, without the projection head (`fc.*`)."""
    return {k[len(prefix):]: v for k, v in weights.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("fc.")}


def backbone_state_dict(checkpoint_or_path: dict[str, Any] | str | os.PathLike,
                        who: str = "student") -> dict[str, torch.Tensor]:
    """The torchvision-named backbone weights (conv1, bn1, layer1..4; no head) of a run.

    Reads a cclnb checkpoint (`model` = MoCo state dict, keys `encoder_q.backbone.*`; `teacher` =
    Encoder state dict, keys `backbone.*`) or the authors' checkpoint (`state_dict` with keys
    `module.encoder_q.*` / `module.teacher.*`, their head being `fc.*`). `who` is "student" (the
    query encoder) or "teacher" (CCL's momentum teacher, which the authors found probes better on
    ImageNet-Full).
    """
    if who not in ("student", "teacher"):
        raise ConfigError(f"who must be 'student' or 'teacher', got {who!r}")
    if isinstance(checkpoint_or_path, dict):
        state, name = checkpoint_or_path, "the checkpoint"
    else:
        name = str(checkpoint_or_path)
        state = _torch_load(Path(checkpoint_or_path), "cpu", allow_numpy=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{name} is neither a cclnb checkpoint nor the authors' (not a dict)")
    if state.get("format") == FORMAT:
        weights, prefix = (state.get("model") or {}, "encoder_q.backbone.") if who == "student" \
            else (state.get("teacher") or {}, "backbone.")
        result = _strip(weights, prefix)
    elif "state_dict" in state:
        module = "encoder_q." if who == "student" else "teacher."
        weights = state["state_dict"]
        result = _strip(weights, "module." + module) or _strip(weights, module)
    else:
        raise CheckpointError(f"{name} is neither a cclnb checkpoint (no 'format': {FORMAT!r}) nor the "
                              "authors' (no 'state_dict'); pass a checkpoint of a pretraining run")
    if not result:
        hint = " (only CCL runs have a teacher; use the student)" if who == "teacher" else ""
        raise CheckpointError(f"{name} holds no {who} backbone weights{hint}")
    return result
