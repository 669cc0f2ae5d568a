"""A run's lifecycle around the loop: its directory, resume checks, stop signals, failure status.

The loop (`cclnb.training.loop`) trains; this module decides *where* and *whether*: a fresh run
gets a new directory (named once, by rank 0) and refuses one that holds checkpoints; a resume
must carry the run's identity (the config fields that change what is trained) and is a no-op on a
complete run; a failure leaves `status.json` saying why, and a collective that failed because
another rank died says so and how to go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from cclnb.config import TrainConfig
from cclnb.data import ImageDataset, open_run_data
from cclnb.data.fingerprint import data_identity
from cclnb.data.jpeg import check_decodable
from cclnb.data.prefetch import check_prefetch
from cclnb.errors import CheckpointError, ConfigError, Interrupted
from cclnb.training import dist, runs
from cclnb.training.checkpoint import load_checkpoint
from cclnb.training.plan import resolve_config


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints, and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread (e.g. inside a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class RunStart:
    """Where a run starts: its resolved config (run_dir set), and the checkpoint it resumes from."""

    config: TrainConfig
    run_dir: Path
    checkpoint: dict[str, Any] | None    # None: a fresh run
    complete: bool = False               # a resume of a finished run: nothing to do


def fresh_run_dir(config: TrainConfig) -> Path:
    """The directory a new run gets when `--run-dir` is not given: runs/<method>-<dataset>-<time>."""
    name = open_run_data(config, "train").name
    return runs.default_run_dir(config.method, name)


def start_run(config: TrainConfig, train_ds: ImageDataset, ctx: dist.DistContext) -> RunStart:
    """Resolve the config and the run directory, check a resume against the run it continues,
    and (rank 0) write the directory's skeleton and, for a fresh run, config.json."""
    checkpoint = None
    if config.resume:
        run_dir, ckpt_path = runs.resolve_resume(config.resume)
        saved = runs.read_config(run_dir)
        # `auto` was resolved when the run started: keep that choice even if the rule has changed since
        precision = saved.get("precision", config.precision) if config.precision == "auto" else config.precision
        config = resolve_config(dataclasses.replace(config, seed=saved["seed"], precision=precision),
                                train_ds.image_size, ctx.device)
        differences = _identity_differences(saved, config)
        if differences:
            raise CheckpointError(f"cannot resume {run_dir} with a different configuration: "
                                  + "; ".join(differences)
                                  + ". Pass the original options (see its config.json) or start a new run.")
        if (runs.read_status(run_dir) or {}).get("state") == "complete":
            if ctx.is_main:
                print(f"{run_dir} is already complete; nothing to resume.")
            return RunStart(config, run_dir, None, complete=True)
        checkpoint = load_checkpoint(ckpt_path)
    else:
        config = resolve_config(config, train_ds.image_size, ctx.device)
        run_dir = Path(config.run_dir) if config.run_dir else _agree_run_dir(config, train_ds.name, ctx)
        _refuse_finished_work(run_dir)
    config = dataclasses.replace(config, run_dir=str(run_dir))
    _check_loader(config, train_ds, ctx.device)
    if ctx.is_main:
        runs.prepare_run_dir(run_dir)
        if checkpoint is None:
            runs.write_config(run_dir, config.to_dict(), {"world_size": ctx.world_size,
                                                          "data_identity": data_identity(train_ds)})
    dist.barrier(ctx)
    return RunStart(config, run_dir, checkpoint)


@contextlib.contextmanager
def failure_status(config: TrainConfig, run_dir: Path, ctx: dist.DistContext) -> Iterator[None]:
    """Record a failure in status.json (rank 0) before it propagates; a signal's `Interrupted`
    has written its own status. A lost peer becomes `RankLost`, which says how to resume."""
    try:
        yield
    except Interrupted:
        raise
    except BaseException as error:
        failure = error
        if dist.lost_peer(error, ctx):
            # torchrun SIGTERMs the survivors of a dead rank; this process is stopping already, so
            # let its status and message out instead of dying silently halfway through them
            with contextlib.suppress(ValueError):   # not the main thread: no signal handling
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            failure = _rank_lost(error, config, run_dir, ctx)
        if ctx.is_main:
            runs.write_status(run_dir, "failed", error=f"{type(failure).__name__}: {failure}")
        if failure is error:
            raise
        raise failure from error


def _check_loader(config: TrainConfig, train_ds: ImageDataset, device: torch.device) -> None:
    """The loader options' preconditions, refused before the run directory is touched (the feeder
    checks them again when built, for users of the loop without a run)."""
    if config.prefetch:
        check_prefetch(config.loader, device)
    if config.loader == "decode":
        check_decodable(train_ds)


def _identity_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    return [f"{f}: run has {saved.get(f)!r}, now {value!r}"
            for f, value in config.identity().items() if saved.get(f) != value]


def _refuse_finished_work(run_dir: Path) -> None:
    """A new run must not start over a run directory that holds checkpoints: it would overwrite
    them and config.json. (A directory without checkpoints lost nothing worth keeping, so a
    rerun of a run killed in its first epoch may reuse it.)"""
    if runs.checkpoint_path(run_dir).is_file():
        state = (runs.read_status(run_dir) or {}).get("state", "unknown")
        raise ConfigError(f"run directory {run_dir} already holds a run ({state}) with checkpoints; "
                          f"continue it with --resume {run_dir} (and the same options) or choose "
                          f"another --run-dir. Nothing in it was changed")


def _rank_lost(error: BaseException, config: TrainConfig, run_dir: Path,
               ctx: dist.DistContext) -> dist.RankLost:
    """A collective failed because another process died or hung: say so, and how to go on."""
    first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return dist.RankLost(
        f"rank {ctx.rank} of {ctx.world_size} lost contact with the other processes: one of them died "
        f"or did not answer within --dist-timeout {config.dist_timeout} s ({first_line}). Look at the "
        f"other ranks' output for the cause. Only rank 0 writes checkpoints, always completely: rerun "
        f"the same command with --resume {run_dir} to continue from {runs.checkpoint_path(run_dir)}")


def _agree_run_dir(config: TrainConfig, dataset_name: str, ctx: dist.DistContext) -> Path:
    """Rank 0 names the run directory and tells the other ranks (their clocks may differ)."""
    name = [str(runs.default_run_dir(config.method, dataset_name))] if ctx.is_main else [""]
    if ctx.distributed:
        torch.distributed.broadcast_object_list(name, src=0)
    return Path(name[0])
