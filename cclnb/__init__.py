"""cclnb: a Jupyter-first, reproducible study of Continual Contrastive Learning (CCL).

The names a notebook or a script needs, importable from here (`from cclnb import Trainer,
TrainConfig, Batch, StepResult`); each is imported on first use, so `import cclnb` (which every
`cclnb.<stage>` import runs first) stays cheap. docs/architecture.md shows them at work.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "TrainConfig": "cclnb.config",
    "CclnbError": "cclnb.errors",
    "ConfigError": "cclnb.errors",
    "open_dataset": "cclnb.data",
    "load_uint8": "cclnb.data",
    "Batch": "cclnb.data.batches",
    "Trainer": "cclnb.training.loop",
    "StepResult": "cclnb.training.loop",
    "TaskPlan": "cclnb.training.plan",
    "plan_tasks": "cclnb.training.plan",
    "evaluate_encoder": "cclnb.evaluate.encoder",
}

__all__ = ["__version__", "train", *_EXPORTS]

if TYPE_CHECKING:
    from cclnb.config import TrainConfig


def train(config: "TrainConfig") -> Path:
    """Run (or resume) one continual pretraining, measured after every task as
    `config.eval_each_task` says, and return its run directory: the training stage's `train`
    with the evaluation stage's per-task evaluator."""
    from cclnb.evaluate.per_task import task_evaluator
    from cclnb.training.run import train as train_run

    return train_run(config, task_evaluator)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cclnb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
