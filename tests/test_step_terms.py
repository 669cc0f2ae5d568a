"""One CCL step read term by term (what the exploration notebook shows), through the trainer's
public API on the embedded digits."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from cclnb.config import TrainConfig
from cclnb.data import load_uint8, open_dataset
from cclnb.training.step_terms import ccl_step, ccl_step_figure


def test_one_ccl_step_has_every_term_and_row_stochastic_similarities():
    ds = open_dataset("demo")
    config = TrainConfig(data="demo", arch="resnet18", stem="imagenet", n_tasks=5, seed=0,
                         precision="fp32", device="cpu")
    step = ccl_step(config, load_uint8(ds), ds.targets)
    assert set(step.losses) == {"total", "moco", "extra", "distill"}
    assert step.losses["extra"] > 0 and step.losses["distill"] > 0
    np.testing.assert_allclose(step.losses["total"],
                               step.losses["moco"] + step.losses["extra"] + step.losses["distill"], rtol=1e-5)
    assert step.logits.shape == (step.batch_size, 1 + 256)
    assert step.student_sim.shape == step.teacher_sim.shape == (step.n_old, step.n_old)
    np.testing.assert_allclose(step.student_sim.sum(axis=1), 1, rtol=1e-4)
    np.testing.assert_allclose(step.teacher_sim.sum(axis=1), 1, rtol=1e-4)
    fig = ccl_step_figure(step)
    assert isinstance(fig, Figure) and len(fig.axes) == 5       # 3 panels + 2 colour bars
