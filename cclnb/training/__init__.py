"""Training: a method trains the MoCo v2 encoder over the task plan and writes its run directory.

`plan` (the task split, the only use of labels) -> `lifecycle` (the run directory: fresh or
resumed, stop signals, failure status) -> `loop` (`Trainer`: tasks, epochs, steps, checkpoints)
-> `run` (`train`, the four put together). May import `cclnb.errors`, `cclnb.config` and the data
stage; never the evaluation or the study (the per-task evaluation comes in as a callback).
"""

from cclnb.training.loop import Evaluator, StepResult, Trainer
from cclnb.training.plan import SMALL_IMAGE_MAX, TaskPlan, plan_tasks, resolve_config
from cclnb.training.run import EvaluatorFactory, train

__all__ = ["SMALL_IMAGE_MAX", "Evaluator", "EvaluatorFactory", "StepResult", "TaskPlan", "Trainer",
           "plan_tasks", "resolve_config", "train"]
