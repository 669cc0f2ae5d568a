"""A run stopped by SIGTERM and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from cclnb import train
from cclnb.errors import Interrupted
from cclnb.training.methods.ccl import CCL
from cclnb.training.runs import log_columns
from test_trainer import load_ckpt, one_thread, tiny_config  # noqa: F401  (fixture re-used)


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("model", "teacher"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            torch.testing.assert_close(a[part][name], b[part][name], rtol=0, atol=0, msg=f"{part}.{name}")
    for name, value in a["method"]["extra_queue"].items():
        torch.testing.assert_close(value, b["method"]["extra_queue"][name], rtol=0, atol=0)
    assert [r.tolist() for r in a["replay"]] == [r.tolist() for r in b["replay"]]
    assert (a["task"], a["global_step"]) == (b["task"], b["global_step"])


# 3 steps per epoch, 2 epochs per task: mid task 0 epoch 1 / task 1; with print_freq 2 the stop step
# (step 2 of task 0, epoch 1) is also a logged one, whose row a resume once lost (its record's
# final_loss_moco then differed from an uninterrupted run's)
@pytest.mark.parametrize("stop_at, print_freq", [(5, 10), (8, 10), (5, 2)],
                         ids=["task0", "task1", "at-a-logged-step"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, stop_at, print_freq):
    common = dict(epochs=2, deterministic=True, save_every=1, print_freq=print_freq)
    reference = train(tiny_config(tmp_path, "CCL", run_dir=str(tmp_path / "ref"), **common))

    calls = {"n": 0}
    original = CCL.after_step

    def after_step(self, batch, keys_all, is_old_all):
        original(self, batch, keys_all, is_old_all)
        calls["n"] += 1
        if calls["n"] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)     # arrives mid-step; the step is finished first

    monkeypatch.setattr(CCL, "after_step", after_step)
    config = tiny_config(tmp_path, "CCL", run_dir=str(tmp_path / "cut"), **common)
    with pytest.raises(Interrupted, match="--resume"):
        train(config)
    run = Path(config.run_dir)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["global_step"] == stop_at
    monkeypatch.setattr(CCL, "after_step", original)

    resumed = train(tiny_config(tmp_path, "CCL", run_dir=str(tmp_path / "other"), resume=str(run), **common))
    assert resumed == run
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert_same_state(load_ckpt(reference / "checkpoints" / "last.pt"), load_ckpt(run / "checkpoints" / "last.pt"))
    for t in (0, 1):
        assert (reference / "replay" / f"task_{t}.json").read_text() == (run / "replay" / f"task_{t}.json").read_text()
    # the loss log too, the stopped epoch's mean row included (the run saved its partial sums)
    timeless = [c for c in log_columns(("extra", "distill")) if c not in ("time_s", "img_per_s")]
    assert (pd.read_csv(run / "train_log.csv")[timeless].to_dict("records")
            == pd.read_csv(reference / "train_log.csv")[timeless].to_dict("records"))


def test_truncated_last_checkpoint_is_a_clear_error(tmp_path):
    from cclnb.errors import CheckpointError

    run = train(tiny_config(tmp_path, "Finetuning", n_tasks=2))
    status = json.loads((run / "status.json").read_text())
    status["state"] = "interrupted"
    (run / "status.json").write_text(json.dumps(status))
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="last.pt"):
        train(tiny_config(tmp_path, "Finetuning", resume=str(run)))
