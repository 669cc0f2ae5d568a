"""`train(config)`: one pretraining run from the command line, a notebook or a torchrun worker.

It reads as the run does: plan the tasks, prepare the run directory (fresh or resumed), build the
trainer, run it. How the run is measured after each task is not this stage's business: the caller
passes an `EvaluatorFactory` (`cclnb.evaluate.task_evaluator`, which `cclnb.train` binds).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from cclnb.config import TrainConfig
from cclnb.data import ImageDataset, open_run_data
from cclnb.errors import ConfigError
from cclnb.training import dist
from cclnb.training.lifecycle import failure_status, fresh_run_dir, start_run
from cclnb.training.loop import Evaluator, Trainer
from cclnb.training.methods import resolve
from cclnb.training.plan import TaskPlan, plan_tasks

# (config, training dataset, plan, run directory, process) -> the per-task evaluator, or None
# where this process does not evaluate
EvaluatorFactory = Callable[[TrainConfig, ImageDataset, TaskPlan, Path, dist.DistContext], Evaluator | None]


def train(config: TrainConfig, evaluator: EvaluatorFactory | None = None) -> Path:
    """Run (or resume) a continual pretraining and return its run directory. `evaluator` builds
    the per-task evaluation `config.eval_each_task` asks for; without one that must be "none"."""
    config = resolve(config)    # the method's name and options, checked before anything starts
    config.validate()
    if evaluator is None and config.eval_each_task != "none":
        raise ConfigError(f"eval_each_task {config.eval_each_task!r} measures the encoder after every "
                          f"task: call cclnb.train (which passes cclnb.evaluate.task_evaluator), or set "
                          f"eval_each_task='none'")
    if config.multiprocessing_distributed and dist.env_world_size() == 1:
        if config.run_dir is None:
            config = dataclasses.replace(config, run_dir=str(fresh_run_dir(config)))
        dist.spawn_per_gpu(_train_process, config, evaluator)
        return Path(config.run_dir)
    return _train_process(config, evaluator)


def _train_process(config: TrainConfig, evaluator: EvaluatorFactory | None) -> Path:
    """One process's share of the run (every rank under torchrun, or the only process)."""
    ctx = dist.setup(config.device, config.dist_backend, config.dist_url, config.dist_timeout, config.gpu)
    try:
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        train_ds = open_run_data(config, "train")
        plan = plan_tasks(config, train_ds.targets, len(train_ds.classes))   # a bad split: no run dir yet
        start = start_run(config, train_ds, ctx)
        if start.complete:
            return start.run_dir
        measure = evaluator(start.config, train_ds, plan, start.run_dir, ctx) if evaluator else None
        with failure_status(start.config, start.run_dir, ctx):
            trainer = Trainer(start.config, train_ds, plan, ctx, start.run_dir, measure)
            if start.checkpoint is not None:
                trainer.load(start.checkpoint)
            trainer.run()
        return start.run_dir
    finally:
        dist.cleanup(ctx)
