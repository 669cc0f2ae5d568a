"""`cclnb study`'s cluster options (`--launcher slurm ...`), without importing submitit.

`cclnb study --help` and a local study must work without the `cluster` extra, so the options are
declared here and `run` imports the launcher only when one is chosen.
"""

from __future__ import annotations

import argparse

from cclnb.errors import ConfigError

LAUNCHERS = ("local", "slurm", "submitit-local")
# option dest -> its flag: the options that only mean something with a cluster launcher
CLUSTER_OPTIONS = {"nodes": "--nodes", "gpus_per_node": "--gpus-per-node", "cpus_per_task": "--cpus-per-task",
                   "mem_gb": "--mem-gb", "time": "--time", "partition": "--partition", "account": "--account",
                   "sbatch": "--sbatch", "setup": "--setup", "max_requeues": "--max-requeues",
                   "wait": "--wait", "dry_run": "--dry-run", "assume_shared_fs": "--assume-shared-fs",
                   "eval_job": "--eval-job", "throughput": "--throughput"}
EVAL_JOBS = ("shared", "separate", "with-training")     # cclnb.launch.cost.LAYOUTS, without importing it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cluster", "run every unfinished (method, seed) as one job through submitit (docs/study.md, "
                   "\"The study on a SLURM cluster\"); defaults per preset")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local: this machine, --jobs at a time (default); slurm: one SLURM job per "
                            "(method, seed); submitit-local: the same jobs as local processes (a check "
                            "of the cluster path without a cluster)")
    group.add_argument("--nodes", type=int, metavar="N", help="nodes per job (torchrun across them)")
    group.add_argument("--gpus-per-node", type=int, metavar="G",
                       help="GPUs per node; training runs one process per GPU under torchrun")
    group.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per node (one task per node)")
    group.add_argument("--mem-gb", type=float, metavar="GB", help="memory per node")
    group.add_argument("--time", metavar="T",
                       help="time limit per allocation (minutes, HH:MM:SS or D-HH:MM:SS); a job stopped "
                            "at it saves and is requeued")
    group.add_argument("--partition", metavar="NAME", help="SLURM partition (checked with sinfo)")
    group.add_argument("--account", metavar="NAME", help="SLURM account")
    group.add_argument("--sbatch", action="append", default=[], metavar="NAME[=VALUE]",
                       help="a further #SBATCH line, e.g. constraint=a100, qos=high, exclusive (repeatable)")
    group.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="a shell line the batch script runs first, e.g. 'module load cuda' (repeatable)")
    group.add_argument("--max-requeues", type=int, metavar="N",
                       help="how often a job stopped at its time limit is requeued (default 3; "
                            "preemptions do not count)")
    group.add_argument("--wait", action="store_true",
                       help="wait for the jobs, then render the report from the records")
    group.add_argument("--dry-run", action="store_true",
                       help="print the job scripts, what each job runs and the estimated GPU-hours by phase "
                            "(cclnb.launch.cost); submit nothing")
    group.add_argument("--eval-job", choices=EVAL_JOBS, default=None,
                       help="shared: each seed's linear evaluations (one pass over the data for all its "
                            "encoders) and records run in one 1-GPU job after all its training jobs succeeded "
                            "(afterok); separate: one such job per pair that trains; with-training: in the "
                            "training job. Default: the one with the fewest allocated GPU-hours (shared when a "
                            "training job holds more than one GPU)")
    group.add_argument("--throughput", action="append", default=[], metavar="KIND=IMG_S",
                       help="images per second per GPU that you measured, for --dry-run's cost estimate: "
                            "train (a MoCo step), train_teacher (a CCL step), features (per-task evaluation), "
                            "lincls (linear evaluation), forward (a frozen forward alone); a value or "
                            "LOW-HIGH (repeatable; default: ../shared/anchors.md's where the preset has them)")
    group.add_argument("--assume-shared-fs", action="store_true",
                       help="skip the check that --runs-root and --reports-root are on storage the "
                            "compute nodes share")


def refuse_cluster_options(args: argparse.Namespace) -> None:
    """A cluster option with the local launcher is a mistake: it would be silently ignored."""
    given = [flag for dest, flag in CLUSTER_OPTIONS.items() if getattr(args, dest) not in (None, False, [])]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to a cluster launcher; add --launcher slurm (or "
                          f"submitit-local), or drop them to run here")


def run(args: argparse.Namespace) -> int:
    """Submit the study with the chosen cluster launcher (`cclnb.launch.cluster`)."""
    try:
        from cclnb.launch import cluster
    except ImportError as error:
        raise ConfigError(f"--launcher {args.launcher} needs the cluster extra ({error}); install it with "
                          f"pip install -e '.[cluster]'") from error
    return cluster.run(args)
