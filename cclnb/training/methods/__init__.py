"""Continual methods on the shared trainer: `get_method(config, env)` builds the one a config names.

Which methods exist is `registry`'s business (built-ins, installed entry points, `method_module`);
nothing else in cclnb lists them.
"""

from __future__ import annotations

from cclnb.config import TrainConfig
from cclnb.training.methods.base import Method, StepOutputs, TrainerEnv
from cclnb.training.methods.registry import (canonical_name, classes, config_from_parameters, load,
                                             method_class, register, resolve, study_methods)


def get_method(config: TrainConfig, env: TrainerEnv) -> Method:
    """The method object for `config.method` (resolved: a variant such as `CCL-no-distill` is CCL
    with its switch already off in the config)."""
    return method_class(config.method)(env)


__all__ = ["Method", "StepOutputs", "TrainerEnv", "canonical_name", "classes", "config_from_parameters",
           "get_method", "load", "method_class", "register", "resolve", "study_methods"]
