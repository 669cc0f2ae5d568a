"""Two processes under torchrun (gloo, CPU): both ranks train two CCL tasks and end identical."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from test_trainer import one_thread  # noqa: F401  (fixture re-used)

WORKER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from cclnb import dist, runs
    from cclnb.config import TrainConfig
    from cclnb.data import open_dataset
    from cclnb.trainer import plan_tasks, pretrain, resolve_config

    out = sys.argv[1]
    config = resolve_config(TrainConfig(
        data="demo", arch="resnet18", stem="imagenet", epochs=1, batch_size=16, moco_k=64, ccl_k=16,
        n_tasks=2, n_save=2, method="CCL", subset_per_class=10, seed=0, progress=False,
        eval_each_task="none", device="cpu", dist_timeout=60), 32)
    ctx = dist.setup("cpu", timeout_s=60)
    ds = open_dataset("demo")
    run_dir = runs.prepare_run_dir(os.path.join(out, "run"))
    trainer = pretrain(config, ds, plan_tasks(config, ds.targets, len(ds.classes)), run_dir, ctx,
                       runs.TrainLog(run_dir, enabled=ctx.is_main))
    torch.save({"model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
                "replay": [r.tolist() for r in trainer.replay], "world": ctx.world_size},
               os.path.join(out, f"rank{ctx.rank}.pt"))
    dist.cleanup(ctx)
""")


def test_two_ranks_under_torchrun_end_with_identical_weights_and_queues(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    for part in ("model",):
        for name, value in ranks[0][part].items():
            torch.testing.assert_close(value, ranks[1][part][name], rtol=0, atol=0, msg=name)
    for name, value in ranks[0]["method"]["extra_queue"].items():
        torch.testing.assert_close(value, ranks[1]["method"]["extra_queue"][name], rtol=0, atol=0)
    for name, value in ranks[0]["method"]["teacher"].items():
        torch.testing.assert_close(value, ranks[1]["method"]["teacher"][name], rtol=0, atol=0)
    assert ranks[0]["replay"] == ranks[1]["replay"] and len(ranks[0]["replay"][0]) > 0
    # the queue took keys from both ranks: 2 tasks x 3 steps x 16 keys, wrapped in 64 slots
    assert int(ranks[0]["model"]["queue_ptr"]) == (2 * 3 * 16) % 64
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "complete"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.pt", "task_0.pt", "task_1.pt"]
