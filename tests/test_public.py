"""The step-by-step example in docs/architecture.md runs as written.

The page is where a notebook author learns the public surface (`from cclnb import Trainer, ...`);
an example that no longer runs would teach the wrong calls, so the test executes the page's own
code block, unchanged, and checks what it says the steps leave behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from test_trainer import one_thread  # noqa: F401  (fixture re-used)

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
HEADING = "### Driving the trainer step by step"


def documented_example() -> str:
    """The first ```python block after HEADING."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(HEADING)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block under {HEADING!r} in {DOC}"
    return match.group(1)


def test_the_documented_step_by_step_example_runs_as_written(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)                       # it must write nothing, wherever it runs
    names: dict = {}
    exec(compile(documented_example(), str(DOC), "exec"), names)
    trainer, result = names["trainer"], names["result"]
    assert trainer.task == 1 and trainer.epoch == 1 and len(trainer.replay) == 1
    assert set(result.losses) == {"total", "moco", "extra", "distill"}
    assert all(torch.isfinite(v) for v in result.losses.values())
    assert names["results"] and result.logits.shape[1] == 1 + trainer.config.moco_k
    assert not list(tmp_path.iterdir())
