"""What one cluster job asks for, and the checks made before anything is submitted.

A study on a cluster is one job per (method, seed). Every job asks for the same allocation:
`nodes` nodes, on each one task with `gpus_per_node` GPUs, `cpus_per_task` CPUs and `mem_gb` of
memory, for `time_min` minutes. The presets carry defaults sized for their setting (`PRESETS`);
options override them. Inside the job the task-sequence notebook trains under torchrun with one
process per GPU when the allocation has more than one (`processes_per_node`).

Why the checks: a bad job fails minutes or hours later, after a queue wait, on a node whose log
the user must find. Everything that can be known on the login node is checked here first, so a
mistake costs one command and submits nothing: a partition the cluster does not have, a GPU preset
on an allocation without GPUs, a global batch that does not split over the processes, and run or
record folders on storage the compute nodes do not share (their records would never reach the
report).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cclnb.errors import ConfigError
from cclnb.launch import torchrun


@dataclass(frozen=True)
class Resources:
    """One job's allocation and how SLURM may requeue it."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2             # the job's CPUs on each node (one task per node)
    mem_gb: float = 8
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    sbatch: tuple[tuple[str, str | bool], ...] = ()   # further #SBATCH lines: (name, value or True)
    setup: tuple[str, ...] = ()        # shell lines the batch script runs first (module load ...)
    max_requeues: int = 3              # requeues at the time limit (preemptions do not count)

    @property
    def processes_per_node(self) -> int:
        """Training processes per node: one per GPU, or one on a CPU allocation."""
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def uses_torchrun(self) -> bool:
        return self.world_size > 1

    def evaluation_only(self) -> "Resources":
        """What a pair that never trains needs (the untrained baselines evaluate in one process):
        one node, at most one GPU, and that GPU's share of the CPUs and memory."""
        share = self.processes_per_node
        return dataclasses.replace(self, nodes=1, gpus_per_node=min(1, self.gpus_per_node),
                                   cpus_per_task=max(1, self.cpus_per_task // share), mem_gb=self.mem_gb / share)

    def torchrun_args(self, node_rank: int = 0, master_addr: str | None = None,
                      master_port: int | str | None = None) -> list[str]:
        """torchrun's options for this allocation ([] when one process trains in the kernel)."""
        if not self.uses_torchrun:
            return []
        return torchrun.options(self.nodes, self.processes_per_node, node_rank, master_addr, master_port)

    def describe(self) -> str:
        """One line for the terminal, printed before anything is submitted."""
        gpus = f"{self.gpus_per_node} GPU(s)" if self.gpus_per_node else "no GPU"
        hours, minutes = divmod(self.time_min, 60)
        extra = ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in self.sbatch)
        return (f"{self.nodes} node(s) x {gpus}, {self.cpus_per_task} CPUs and {self.mem_gb:g} GB per node, "
                f"time limit {hours:d}:{minutes:02d}:00 (requeued up to {self.max_requeues} times at it), "
                f"partition {self.partition or '(the default)'}, account {self.account or '(the default)'}"
                + (f", sbatch {extra}" if extra else "")
                + (f"; training: {self.world_size} processes under torchrun" if self.uses_torchrun
                   else "; training: one process in the notebook's kernel"))


_GPU_PRESET = Resources(gpus_per_node=1, cpus_per_task=8, mem_gb=32, time_min=240)
# Per preset: what one (method, seed) needs. The CPU presets were sized for 2 cores (docs/study.md);
# the 32 px GPU presets fit one GPU; imagenet-sub is the authors' 8 GPUs (ResNet-50 at 224 px,
# 200 epochs per task: README, "The study on a SLURM cluster", for the expected cost), 8 CPUs per
# GPU for the PIL loaders, 24 hours per allocation with requeues beyond it.
PRESETS: dict[str, Resources] = {
    "demo": Resources(cpus_per_task=2, mem_gb=8, time_min=30),
    "tin100-32-cpu": Resources(cpus_per_task=2, mem_gb=16, time_min=180),
    "tin100-32-cpu-w16": Resources(cpus_per_task=2, mem_gb=16, time_min=180),
    "tin100-32": _GPU_PRESET,
    "tin200-32": _GPU_PRESET,
    "cifar100": _GPU_PRESET,
    "imagenet-sub": Resources(gpus_per_node=8, cpus_per_task=64, mem_gb=256, time_min=24 * 60),
}


def for_preset(name: str, devices: Sequence[str]) -> Resources:
    """The preset's allocation; a preset without one (added since) gets one GPU when its notebooks
    ask for CUDA, else a small CPU allocation."""
    if name in PRESETS:
        return PRESETS[name]
    return _GPU_PRESET if "cuda" in devices else Resources()


def with_options(base: Resources, **options: Any) -> Resources:
    """`base` with every option that was given (not None) replacing its field; checked."""
    chosen = dataclasses.replace(base, **{k: v for k, v in options.items() if v is not None})
    checks = [(chosen.nodes >= 1, f"--nodes must be >= 1, got {chosen.nodes}"),
              (chosen.gpus_per_node >= 0, f"--gpus-per-node must be >= 0, got {chosen.gpus_per_node}"),
              (chosen.cpus_per_task >= 1, f"--cpus-per-task must be >= 1, got {chosen.cpus_per_task}"),
              (chosen.mem_gb > 0, f"--mem-gb must be > 0, got {chosen.mem_gb}"),
              (chosen.time_min >= 1, f"--time must be at least one minute, got {chosen.time_min} min"),
              (chosen.max_requeues >= 0, f"--max-requeues must be >= 0, got {chosen.max_requeues}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return chosen


_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?")


def parse_time(text: str) -> int:
    """SLURM's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in minutes,
    seconds rounded up."""
    match = _TIME.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"--time {text!r}: write minutes (90), HH:MM:SS (1:30:00) or D-HH:MM:SS "
                          f"(1-12:00:00), as sbatch --time does")
    days, a, b, c = (int(v) if v is not None else None for v in match.group("days", "a", "b", "c"))
    if days is None:   # M | M:S | H:M:S
        hours, minutes, seconds = (a, b, c) if c is not None else (0, a, b or 0)
    else:              # D-H | D-H:M | D-H:M:S
        hours, minutes, seconds = a + 24 * days, b or 0, c or 0
    return hours * 60 + minutes + (1 if seconds else 0)


# #SBATCH lines the launcher writes itself: the options that set them, or submitit's own.
_OWN_SBATCH = {"job_name": "the study", "partition": "--partition", "account": "--account",
               "time": "--time", "nodes": "--nodes", "ntasks_per_node": "cclnb (one task per node)",
               "ntasks": "cclnb (one task per node)", "cpus_per_task": "--cpus-per-task",
               "gpus_per_node": "--gpus-per-node", "gres": "--gpus-per-node", "mem": "--mem-gb",
               "output": "submitit (the job's log)", "error": "submitit (the job's log)",
               "signal": "submitit (the warning before the time limit)",
               "open_mode": "submitit", "array": "submitit", "requeue": "submitit (requeue)"}


def parse_sbatch(lines: Sequence[str]) -> tuple[tuple[str, str | bool], ...]:
    """`--sbatch` values (`constraint=a100`, `--qos=high`, `exclusive`) as (name, value) pairs."""
    parsed: list[tuple[str, str | bool]] = []
    for line in lines:
        name, sep, value = line.strip().lstrip("-").partition("=")
        key = name.strip().replace("-", "_")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key) or (sep and not value.strip()):
            raise ConfigError(f"--sbatch {line!r}: write one sbatch option as name=value or a bare "
                              f"flag, e.g. --sbatch constraint=a100 --sbatch exclusive")
        if key in _OWN_SBATCH:
            raise ConfigError(f"--sbatch {line!r}: {key.replace('_', '-')} is set by {_OWN_SBATCH[key]}; "
                              f"use that instead")
        parsed.append((key, value.strip() if sep else True))
    return tuple(parsed)


# ----------------------------------------------------------------------------- checks
def check_devices(devices: Mapping[str, str], resources: Resources, preset: str) -> str | None:
    """Refuse a notebook that asks for CUDA on an allocation without GPUs; return a warning when
    GPUs are allocated but nothing will use them."""
    cuda = sorted(nb for nb, device in devices.items() if device == "cuda")
    if cuda and resources.gpus_per_node == 0:
        raise ConfigError(f"preset {preset!r} runs {' and '.join(cuda)} on device cuda, but the job asks for "
                          f"no GPU (--gpus-per-node 0): it would fail on its node after the queue wait. "
                          f"Ask for GPUs with --gpus-per-node N (and a GPU --partition), or train on the "
                          f"CPU with -p device=cpu -p linear_eval.device=cpu")
    if resources.gpus_per_node and all(device == "cpu" for device in devices.values()):
        return (f"note: the notebooks run on device cpu, so the {resources.gpus_per_node} GPU(s) per node "
                f"would sit idle; use --gpus-per-node 0 or -p device=cuda")
    return None


def check_world(parameters: Mapping[str, Any], resources: Resources) -> None:
    """The trainer's own rules for splitting a batch over processes, applied before submission."""
    from cclnb.data.batches import check_batch
    from cclnb.study import train_config
    from cclnb.training.loop import groups_per_rank

    if not resources.uses_torchrun:
        return
    config = train_config(parameters)
    world = resources.world_size
    try:
        check_batch(config.batch_size, config.batch_size, world, 0)
        groups_per_rank(config.bn_groups, world, "-p bn_groups")
        groups_per_rank(config.key_bn_groups, world, "-p key_bn_groups")
    except ConfigError as error:
        raise ConfigError(f"{resources.nodes} node(s) x {resources.processes_per_node} GPU(s) train in "
                          f"{world} processes: {error} (or change --gpus-per-node / --nodes)") from error


def partitions(sinfo: str = "sinfo") -> dict[str, tuple[bool, int]] | None:
    """The cluster's partitions as name -> (is the default, most GPUs on one of its nodes), from
    `sinfo`; None when sinfo is not on PATH (not a SLURM machine)."""
    if shutil.which(sinfo) is None:
        return None
    try:
        out = subprocess.run([sinfo, "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (subprocess.SubprocessError, OSError) as error:
        raise ConfigError(f"`sinfo` failed ({error}); the partitions cannot be checked. Is SLURM "
                          f"reachable from this machine?") from error
    found: dict[str, tuple[bool, int]] = {}
    for line in out.splitlines():
        name, _, gres = line.strip().partition("|")
        if not name:
            continue
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = max([int(n) for n in re.findall(r"gpu(?::[^:,(\s]+)?:(\d+)", gres)] or [0])
        was_default, most = found.get(name, (False, 0))
        found[name] = (default or was_default, max(most, gpus))
    return found


def check_partition(resources: Resources, found: Mapping[str, tuple[bool, int]]) -> None:
    """The partition must exist (or a default must), and hold nodes with the GPUs asked for."""
    names = ", ".join(sorted(found)) or "none"
    if resources.partition is None:
        defaults = [name for name, (default, _) in found.items() if default]
        if not defaults:
            raise ConfigError(f"this cluster has no default partition; choose one with --partition "
                              f"(sinfo lists: {names})")
        partition = defaults[0]
    else:
        partition = resources.partition
        if partition not in found:
            raise ConfigError(f"partition {partition!r} is not on this cluster (sinfo lists: {names}); "
                              f"choose one of them with --partition")
    most = found[partition][1]
    if resources.gpus_per_node > most:
        gpu_partitions = ", ".join(sorted(n for n, (_, g) in found.items() if g >= resources.gpus_per_node))
        raise ConfigError(f"partition {partition!r} has nodes with at most {most} GPU(s), but the job asks for "
                          f"{resources.gpus_per_node} per node; choose a partition with them "
                          f"(--partition {gpu_partitions or '...: none has that many'}) or lower "
                          f"--gpus-per-node")


# File systems that live on one machine: a path on one of them is not the same folder on a node.
NODE_LOCAL_FS = frozenset({"tmpfs", "ramfs", "devtmpfs", "overlay", "ext2", "ext3", "ext4", "xfs",
                           "btrfs", "zfs", "f2fs", "vfat", "exfat", "squashfs"})
NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")


def _mount_of(path: Path, mounts_file: str = "/proc/self/mounts") -> tuple[str, str] | None:
    """(mount point, file-system type) holding `path`, or None where the mount table is unreadable."""
    try:
        lines = Path(mounts_file).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    best: tuple[str, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].encode().decode("unicode_escape")   # \040 = a space in the mount point
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])
    return best


def check_shared(folders: Mapping[str, Path]) -> None:
    """Refuse run or record folders that the compute nodes cannot see (node-local storage)."""
    for what, folder in folders.items():
        path = folder.resolve()
        while not path.exists() and path != path.parent:
            path = path.parent
        local_dirs = [*NODE_LOCAL_DIRS, *([os.environ["TMPDIR"]] if os.environ.get("TMPDIR") else [])]
        under = next((d for d in local_dirs if str(path) == d or str(path).startswith(d.rstrip("/") + "/")), None)
        mount = _mount_of(path)
        if under is not None:
            reason = f"under {under}, which is every machine's own"
        elif mount is not None and mount[1] in NODE_LOCAL_FS:
            reason = f"on a local {mount[1]} file system (mounted at {mount[0]})"
        else:
            continue
        raise ConfigError(f"the {what} {folder} is {reason}: the compute nodes do not share it, so their "
                          f"run directories and records would never reach this machine's report. Put "
                          f"--runs-root and --reports-root on the cluster's shared file system (where your "
                          f"home or project folder is), or pass --assume-shared-fs if this folder is "
                          f"mounted at the same path on every node")
