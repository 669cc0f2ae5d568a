"""Finetuning: MoCo v2 on the current task only; everything is the base class's behaviour."""

from __future__ import annotations

from cclnb.training.methods.base import Method


class Finetuning(Method):
    """The lower bound: no replay, no extra loss; earlier tasks are never seen again."""

    name = "Finetuning"
    aliases = ("FT",)
