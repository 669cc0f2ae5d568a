"""Two processes under torchrun (gloo, CPU): both ranks train two CCL tasks and end identical, and
the per-task evaluation, shared by the ranks, equals one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from test_trainer import one_thread  # noqa: F401  (fixture re-used)

WORKER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from cclnb.config import TrainConfig
    from cclnb.data import open_dataset
    from cclnb.evaluate import task_evaluator
    from cclnb.training import Trainer, dist, plan_tasks, resolve_config, runs

    out = sys.argv[1]
    config = resolve_config(TrainConfig(
        data="demo", arch="resnet18", stem="imagenet", epochs=1, batch_size=16, moco_k=64, ccl_k=16,
        n_tasks=2, n_save=2, method="CCL", subset_per_class=10, seed=0, progress=False,
        eval_each_task="knn", eval_teacher=True, eval_bank_per_class=5, knn_k=5, device="cpu", dist_timeout=60,
        bn_groups=2, key_bn_groups=2), 32)
    ctx = dist.setup("cpu", timeout_s=60)
    ds = open_dataset("demo")
    run_dir = runs.prepare_run_dir(os.path.join(out, "run"))
    plan = plan_tasks(config, ds.targets, len(ds.classes))
    trainer = Trainer(config, ds, plan, ctx, run_dir, task_evaluator(config, ds, plan, run_dir, ctx))
    trainer.run()
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
    # every rank evaluated after each task (a rank skipping it would leave the others in a collective)
    for who in ("student", "teacher"):
        rows = (tmp_path / "run" / "eval" / f"acc_knn_{who}.csv").read_text().splitlines()
        assert len(rows) == 3, rows                                    # header + one row per task


STEP_WORKER = textwrap.dedent("""
    import os, sys, numpy as np, torch
    torch.set_num_threads(1)
    from cclnb.config import TrainConfig
    from cclnb.data import load_uint8, open_dataset
    from cclnb.data.batches import Batch
    from cclnb.training import Trainer, dist, plan_tasks, resolve_config

    out, groups = sys.argv[1], int(sys.argv[2])
    ctx = dist.setup("cpu", timeout_s=60)
    config = resolve_config(TrainConfig(
        data="demo", arch="resnet18", stem="imagenet", epochs=2, batch_size=16, moco_k=64, ccl_k=16,
        n_tasks=2, n_save=2, method="CCL", subset_per_class=10, seed=0, progress=False,
        eval_each_task="none", device="cpu", precision="fp32", bn_groups=groups,
        key_bn_groups=groups, ccl_distill_group=16 // groups, loader="tensor"), 32)
    ds = open_dataset("demo")
    plan = plan_tasks(config, ds.targets, len(ds.classes))
    trainer = Trainer(config, load_uint8(ds), plan, ctx)
    trainer.start_task(1)                      # teacher and key encoder reset, extra queue filled
    trainer.epoch = 1
    trainer.begin_epoch()                      # the teacher runs in train mode (code mode, epoch 1)
    make = torch.Generator().manual_seed(3)
    views = [torch.randn(16, 3, 32, 32, generator=make) for _ in range(3)]
    old_all = np.zeros(16, bool)
    old_all[[1, 5, 9, 12]] = True              # replayed rows in both halves of the global batch
    local = 16 // ctx.world_size
    rows = slice(ctx.rank * local, (ctx.rank + 1) * local)
    batch = Batch(q=views[0][rows], k=views[1][rows], anchor=views[2][rows],
                  is_old=torch.from_numpy(old_all[rows]), ids=torch.arange(16)[rows],
                  old_host=old_all[rows], old_all_host=old_all)
    result = trainer.train_step(batch, torch.Generator().manual_seed(7))
    torch.save({"losses": {k: v.clone() for k, v in result.losses.items()},
                "grads": {n: p.grad.clone() for n, p in trainer.model.encoder_q.named_parameters()},
                "model": trainer.model.state_dict(), "teacher": trainer.method.teacher.state_dict(),
                "extra_queue": trainer.method.extra_queue.state_dict()},
               os.path.join(out, f"{ctx.world_size}proc_rank{ctx.rank}.pt"))
    dist.cleanup(ctx)
""")


def test_one_process_with_n_bn_groups_equals_n_ranks(tmp_path):
    """Per-GPU BatchNorm emulated in one process (2 groups) = 2 ranks under torchrun on the same
    global batch: the same losses, gradients, BatchNorm statistics (student, key encoder,
    teacher in train mode), queues. Distillation, extra queue and the key shuffle are all on."""
    script = tmp_path / "step.py"
    script.write_text(STEP_WORKER)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path), "2"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", "2", str(script), str(tmp_path), "2"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one = torch.load(tmp_path / "1proc_rank0.pt", weights_only=True)
    two = [torch.load(tmp_path / f"2proc_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ("moco", "extra", "distill", "total"):       # each rank's loss is over its half
        mean = (two[0]["losses"][name] + two[1]["losses"][name]) / 2
        torch.testing.assert_close(one["losses"][name], mean, atol=1e-5, rtol=1e-4, msg=name)
    assert float(one["losses"]["distill"]) > 0
    for part in ("grads", "model", "teacher", "extra_queue"):
        for name, value in one[part].items():
            torch.testing.assert_close(value, two[0][part][name], atol=1e-5, rtol=1e-4,
                                       msg=f"{part}.{name}")


EVAL_WORKER = textwrap.dedent("""
    import os, sys, numpy as np, torch
    from pathlib import Path
    torch.set_num_threads(1)
    from cclnb.config import TrainConfig
    from cclnb.data import load_uint8, open_dataset
    from cclnb.evaluate import extract_features, task_evaluator
    from cclnb.training import dist, plan_tasks, resolve_config
    from cclnb.training.models import build_backbone

    out = Path(sys.argv[1])
    ctx = dist.setup("cpu", timeout_s=60)
    ds = open_dataset("demo")
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", True, "cifar", 8)
    for module in backbone.modules():          # eval-mode BatchNorm that is not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    for loader in ("tensor", "workers"):       # decoded uint8 arrays; the PIL path through a DataLoader
        config = resolve_config(TrainConfig(
            data="demo", arch="resnet18", stem="cifar", width=8, n_tasks=5, batch_size=32, progress=False,
            device="cpu", precision="fp32", eval_each_task="both", eval_bank_per_class=50, knn_k=20,
            loader=loader), 32)
        plan = plan_tasks(config, ds.targets, len(ds.classes))
        run_dir = out / f"{ctx.world_size}proc" / loader
        run_dir.mkdir(parents=True, exist_ok=True)
        evaluate = task_evaluator(config, ds, plan, run_dir, ctx)
        evaluate(backbone, 0, "student")       # bank 500 images: 2 batches of 256, one per rank
        evaluate(backbone, 1, "student")
    run_dir = out / f"{ctx.world_size}proc"
    images = load_uint8(ds, ids=np.arange(300))
    features = {f"{n}x{b}": extract_features(backbone, images[:n], "cpu", batch_size=b, progress=False, ctx=ctx)
                for n, b in ((300, 64), (100, 256))}   # 5 uneven batches; one batch: rank 1 has none
    torch.save(features, run_dir / f"features{ctx.rank}.pt")
    dist.cleanup(ctx)
""")


def test_per_task_evaluation_in_shards_over_two_ranks_equals_one_process(tmp_path):
    """Every rank extracts a share of the bank's and the val set's features (the same batches one
    process cuts, rank r taking every second one); gathered, they are the one process's features
    to the bit, and the kNN and probe rows rank 0 writes are the one process's rows."""
    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one, two = tmp_path / "1proc", tmp_path / "2proc"
    for loader in ("tensor", "workers"):
        names = sorted(p.name for p in (one / loader / "eval").iterdir())
        assert names == ["acc_knn_student.csv", "acc_probe_student.csv"]
        assert sorted(p.name for p in (two / loader / "eval").iterdir()) == names
        for name in names:
            rows = (one / loader / "eval" / name).read_text()
            assert (two / loader / "eval" / name).read_text() == rows, (loader, name)
            assert len(rows.splitlines()) == 3                                   # header + 2 tasks
    reference = torch.load(one / "features0.pt", weights_only=True)
    for rank in (0, 1):
        gathered = torch.load(two / f"features{rank}.pt", weights_only=True)
        for key, value in reference.items():
            assert torch.equal(gathered[key], value), (rank, key)
