"""Continual methods on the shared trainer; `get_method(config, env)` picks one by name."""

from __future__ import annotations

from cclnb.config import METHODS, TrainConfig, base_method
from cclnb.training.methods.base import Method, StepOutputs, TrainerEnv
from cclnb.training.methods.ccl import CCL
from cclnb.training.methods.finetuning import Finetuning
from cclnb.training.methods.joint import Joint
from cclnb.training.methods.simple_replay import SimpleReplay

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (Finetuning, SimpleReplay, CCL, Joint)}
assert set(REGISTRY) == set(METHODS), "every configured method needs a class"


def get_method(config: TrainConfig, env: TrainerEnv) -> Method:
    """The method object for `config.method` (aliases such as the README's `CLL` accepted; an
    ablation such as `CCL-no-distill` is CCL, its switch already off in the config)."""
    return REGISTRY[base_method(config.method)](env)


__all__ = ["CCL", "Finetuning", "Joint", "Method", "REGISTRY", "SimpleReplay", "StepOutputs",
           "TrainerEnv", "get_method"]
