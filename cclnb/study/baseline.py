"""The untrained encoder: the baseline that makes "the encoder learned" visible, not asserted.

A randomly initialised ResNet already classifies easy data well by kNN or a linear probe (on the
demo digits an untrained ResNet-18 scores ~80% all-class kNN). A trained encoder's accuracy means
something only beside that number. So every study also evaluates the encoder its runs *start
from*: same architecture, stem, data and seed (the same initial weights as the trained runs with
that seed, built exactly as the trainer builds them), measured by the trainer's own per-task
evaluation and then by the study's final protocol.

`untrained_run` writes that encoder as a finished run directory (method `untrained`): the
config, the initial weights as `checkpoints/last.pt`, the one-row accuracy matrix. The linear-
evaluation notebook and the record then treat it like any other run.

A second baseline, `untrained-bn`, is the same weights with BatchNorm statistics measured on the
sequence's training images (`calibrate_batchnorm`). A fresh network's BatchNorm layers are the
identity in eval mode; a trained encoder's are not, and that difference alone moves the kNN
accuracy (demo digits: 81% -> 63% with the weights untouched). The pair brackets the question
"did training teach the weights anything": a trained encoder above `untrained-bn` learned more
than its BatchNorm statistics.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from cclnb.config import TrainConfig
from cclnb.data import open_run_data
from cclnb.data.fingerprint import data_identity
from cclnb.errors import ConfigError
from cclnb.study.report import UNTRAINED, UNTRAINED_BN
from cclnb.training import dist, runs
from cclnb.training.checkpoint import save_checkpoint
from cclnb.training.models import MoCo

CALIBRATION_PER_CLASS = 100  # training images per class whose statistics `untrained-bn` takes


def initial_model(config: TrainConfig) -> MoCo:
    """The MoCo model a run with this (resolved) config starts training from: the trainer seeds
    python, torch and numpy with the run's seed, then builds the model first."""
    seed = int(config.seed)
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return MoCo(config.arch, config.moco_dim, config.moco_k, config.mlp, config.small_images, config.stem,
                config.width)


def check_config(config: TrainConfig) -> None:
    """What `untrained_run` needs of its config, checked before it builds anything (`cclnb study`
    also checks it before any step starts)."""
    if not config.run_dir:
        raise ConfigError("the untrained baseline needs a run_dir to write its results to")
    if config.eval_each_task == "none":
        raise ConfigError("the untrained baseline is measured with the study's per-task protocol; "
                          "set eval_each_task to knn, probe or both")
    config.validate()


def untrained_run(config: TrainConfig, calibrate_bn: bool = False) -> Path:
    """Write `config.run_dir` as the finished "run" of the untrained encoder and return it.

    The per-task evaluation is the trainer's (`eval_each_task`, kNN settings, precision), run
    once on the initial weights: row `after_task` 0 of `eval/acc_<protocol>_student.csv` spans
    every task, as Joint's single row does. `calibrate_bn`: first replace the BatchNorm
    statistics of every encoder by those of up to CALIBRATION_PER_CLASS training images per
    class of the sequence (method `untrained-bn`).
    """
    from cclnb.data import subset_per_class
    from cclnb.evaluate import calibrate_batchnorm, eval_inputs, task_evaluator
    from cclnb.training import plan_tasks, resolve_config

    check_config(config)
    train_ds = open_run_data(config, "train")
    config = resolve_config(config, train_ds.image_size)
    run_dir = runs.prepare_run_dir(config.run_dir)
    plan = plan_tasks(config, train_ds.targets, len(train_ds.classes))
    ctx = dist.DistContext(rank=0, world_size=1, local_rank=0,
                           device=dist.resolve_device(config.device))
    model = initial_model(config).to(ctx.device)
    if calibrate_bn:
        ids = plan.all_ids[subset_per_class(train_ds.targets[plan.all_ids], CALIBRATION_PER_CLASS)]
        size = None if config.small_images else config.image_size
        calibrate_batchnorm(model.encoder_q.backbone, eval_inputs(config, train_ds, ids), ctx.device,
                            max(256, config.batch_size), size, config.precision, progress=config.progress)
    method = UNTRAINED_BN if calibrate_bn else UNTRAINED
    runs.write_config(run_dir, {**config.to_dict(), "method": method},
                      {"world_size": 1, "data_identity": data_identity(train_ds)})
    save_checkpoint({"model": model.state_dict(), "seed": config.seed,
                     "config": dataclasses.asdict(config)}, runs.checkpoint_path(run_dir))
    evaluate = task_evaluator(config, train_ds, plan, run_dir, ctx)
    evaluate(model.encoder_q.backbone, 0, "student")
    runs.write_status(run_dir, "complete", task=0, n_tasks=config.n_tasks)
    return run_dir
