"""Pretraining in one process per GPU under torchrun, started from a notebook cell.

The task-sequence notebook trains in its own kernel: one process, one device. A cluster job holds
several GPUs (the authors used 8), and cclnb's trainer uses them when torchrun starts it (env://
rendezvous, `cclnb.training.dist`). A kernel cannot become N processes, so the notebook's training cell
hands its `TrainConfig` to `train` here, which runs

    python -m torch.distributed.run <torchrun options> -m cclnb.launch.torchrun CONFIG.json

and waits. Every worker builds the same config from the file and joins the process group; rank 0
writes the run directory exactly as a one-process run does (config.json, checkpoints, per-task
evaluations, status.json), so the notebook's later cells, the linear evaluation and the record
read it unchanged. The config travels as JSON, not as `cclnb train` flags, because the notebook's
`extra` may set any TrainConfig field and the command line does not expose them all.

Stopping: SIGTERM or SIGINT reaching the workers (SLURM at a time limit or preemption, torchrun
forwarding its own, a notebook interrupt through the kernel's process group) makes them finish
the step, save and exit 130 (`cclnb.training`); `train` then raises `Interrupted`, so the cell
fails the way an in-kernel run that was stopped does, and the next start resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from cclnb.config import TrainConfig
from cclnb.errors import CclnbError, ConfigError, Interrupted
from cclnb.training import runs

WORKER = "cclnb.launch.torchrun"     # `-m` target of every torchrun worker (this module)


class TorchrunFailed(CclnbError):
    """A torchrun worker failed; its own output (above the notebook cell's error) names the cause."""


def options(nnodes: int, nproc_per_node: int, node_rank: int = 0, master_addr: str | None = None,
            master_port: int | str | None = None) -> list[str]:
    """torchrun's options for `nproc_per_node` processes on each of `nnodes` nodes.

    One node: `--standalone` (torchrun picks a free port, so two jobs sharing a node do not
    collide). Several: a static rendezvous at rank 0's node, `master_addr:master_port`, with this
    node's `node_rank`, so that global rank 0, the process that writes the run directory, is on
    node 0 where the notebook runs.
    """
    if nnodes < 1 or nproc_per_node < 1:
        raise ConfigError(f"torchrun needs at least one node and one process per node, got "
                          f"{nnodes} node(s) x {nproc_per_node}")
    if nnodes == 1:
        return ["--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc_per_node)]
    if not master_addr or master_port is None:
        raise ConfigError("a torchrun job over several nodes needs the address and port of node 0 "
                          "(master_addr, master_port)")
    return ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node",
            str(nproc_per_node), "--master_addr", master_addr, "--master_port", str(master_port)]


def command(config_file: str | Path, torchrun_args: Sequence[str]) -> list[str]:
    """The command line that trains the config in `config_file` under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", WORKER, str(config_file)]


def train(config: TrainConfig, torchrun_args: Sequence[str]) -> Path:
    """Train (or resume) `config` under torchrun with `torchrun_args`; return its run directory.

    Raises `Interrupted` when a signal stopped the workers (the checkpoint is saved) and
    `TorchrunFailed` when a worker failed otherwise (status.json's error is quoted).
    """
    if not config.run_dir:
        raise ConfigError("training under torchrun needs run_dir: every process must write the same "
                          "run directory (the task-sequence notebook's run_dir parameter)")
    run_dir = Path(config.run_dir)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cclnb-torchrun-") as folder:
        config_file = Path(folder) / "train_config.json"
        config_file.write_text(json.dumps(config.to_dict()), encoding="utf-8")
        code = _wait(subprocess.Popen(command(config_file, torchrun_args)))
    if code == 0:
        return run_dir
    status_file = run_dir / "status.json"
    fresh = status_file.is_file() and status_file.stat().st_mtime >= started - 1
    status = (runs.read_status(run_dir) or {}) if fresh else {}
    if status.get("state") == "interrupted":
        raise Interrupted(f"training under torchrun was stopped by a signal at task {status.get('task')}, "
                          f"epoch {status.get('epoch')}, step {status.get('step')}; the state is saved in "
                          f"{runs.checkpoint_path(run_dir)}. Continue with resume={run_dir} and the same "
                          f"parameters (`cclnb study` resumes it by itself when run again)")
    reason = f": {status['error']}" if status.get("error") else ""
    raise TorchrunFailed(f"training under torchrun ({' '.join(torchrun_args)}) exited with code {code}"
                         f"{reason}; the workers' output above names the cause. Fix it and run again: "
                         f"a run with checkpoints resumes")


def _wait(process: subprocess.Popen) -> int:
    """Wait for torchrun even through a KeyboardInterrupt: the interrupt reached the workers too
    (same process group), and they are saving a checkpoint that killing torchrun would cut off."""
    with process:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                continue


def main(argv: Sequence[str] | None = None) -> int:
    """A torchrun worker: train the config in the JSON file named by the only argument."""
    from cclnb import train as train_run

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(f"usage: torchrun ... -m {WORKER} CONFIG.json (a TrainConfig as JSON)", file=sys.stderr)
        return 2
    try:
        train_run(TrainConfig.from_dict(json.loads(Path(args[0]).read_text(encoding="utf-8"))))
    except CclnbError as error:
        print(f"cclnb train (rank {os.environ.get('RANK', '0')}): error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
