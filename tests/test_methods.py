"""Method semantics inside the real trainer: queues, teacher, replay buffers, which images a method
trains on, and that pretraining never reads a label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cclnb.config import TrainConfig
from cclnb.data import load_uint8, open_dataset
from cclnb.training import Trainer, dist, plan_tasks, resolve_config, runs
from test_trainer import one_thread, tiny_config  # noqa: F401  (fixture re-used)

CPU = dist.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_trainer(tmp_path, method: str, **overrides):
    config = resolve_config(tiny_config(tmp_path, method, **overrides), 32)
    ds = open_dataset("demo")
    plan = plan_tasks(config, ds.targets, len(ds.classes))
    run_dir = runs.prepare_run_dir(tmp_path / "run")
    trainer = Trainer(config, ds, plan, CPU, run_dir)
    return trainer, plan


def record_steps(trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wrap the method's after_step to record (keys, is_old) of every step."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = trainer.method.after_step

    def after_step(batch, keys_all, is_old_all):
        seen.append((keys_all.clone(), is_old_all.clone()))
        original(batch, keys_all, is_old_all)

    trainer.method.after_step = after_step
    return seen


def test_main_queue_is_fifo_over_all_keys_and_extra_queue_takes_only_replayed_keys(tmp_path):
    trainer, _ = make_trainer(tmp_path, "CCL", moco_k=96, ccl_k=16, n_save=3)
    seen = record_steps(trainer)
    extra_at_task_1 = {}
    original_start = trainer.method.on_task_start

    def on_task_start(task):
        main_before = trainer.model.queue.clone()
        original_start(task)
        if task == 1:
            extra_at_task_1["extra"] = trainer.method.extra_queue.queue.clone()
            extra_at_task_1["main"] = main_before

    trainer.method.on_task_start = on_task_start
    trainer.run()
    model, extra = trainer.model, trainer.method.extra_queue
    keys = torch.cat([k for k, _ in seen])                          # every key, in order
    assert int(model.queue_ptr) == len(keys) % 96
    newest = keys[-96:] if len(keys) >= 96 else keys
    ring = torch.roll(model.queue, -int(model.queue_ptr), dims=1)[:, -len(newest):]
    torch.testing.assert_close(ring, newest.t())                    # FIFO: the newest keys, in order
    # extra queue: the main queue's first ccl_k columns at the start of task 1, then old keys only
    torch.testing.assert_close(extra_at_task_1["extra"], extra_at_task_1["main"][:, :16])
    steps_task_0 = len(seen) // 2
    old_keys = torch.cat([k[o] for k, o in seen[steps_task_0:]])
    assert 0 < len(old_keys) < 16
    assert int(extra.queue_ptr) == len(old_keys)
    torch.testing.assert_close(extra.queue[:, :len(old_keys)], old_keys.t())
    torch.testing.assert_close(extra.queue[:, len(old_keys):], extra_at_task_1["main"][:, len(old_keys):16])
    assert all(not o.any() for _, o in seen[:steps_task_0])         # task 0 has no replayed image


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers()}


@pytest.mark.parametrize("stats", ["own", "student"])
def test_teacher_reset_copies_parameters_and_ema_once_per_epoch(tmp_path, stats):
    """At a task start teacher and key encoder take the student's parameters. Default ("own", the
    authors'): both keep their own BatchNorm buffers, i.e. a fresh network's (mean 0, variance 1)
    for the teacher at the second task and what it gathered itself at the third; "student": the
    teacher takes the student's buffers too. The EMA runs once per epoch on parameters."""
    trainer, _ = make_trainer(tmp_path, "CCL", epochs=2, n_tasks=5, ccl_teacher_stats=stats)
    method, model = trainer.method, trainer.model
    events, snapshots = [], {}
    original_end, original_start = method.on_epoch_end, method.on_task_start

    def on_epoch_end(task, epoch):
        before = [p.clone() for p in method.teacher.parameters()] if method.teacher_active else None
        events.append((task, epoch, method.teacher.training if method.teacher_active else None))
        original_end(task, epoch)
        if before is not None:
            m = trainer.config.ccl_teacher_m
            for t_old, t_new, s in zip(before, method.teacher.parameters(), model.encoder_q.parameters()):
                torch.testing.assert_close(t_new, m * t_old + (1 - m) * s.detach())

    def on_task_start(task):
        teacher_before, key_before = _buffers(method.teacher), _buffers(model.encoder_k)
        original_start(task)
        if task in (1, 2):
            snapshots[task] = teacher_before
            for a, b in zip(method.teacher.parameters(), model.encoder_q.parameters()):
                torch.testing.assert_close(a, b)
            for a, b in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
                torch.testing.assert_close(a, b)
            expected = _buffers(model.encoder_q) if stats == "student" else teacher_before
            for name, value in method.teacher.named_buffers():
                torch.testing.assert_close(value, expected[name])
            for name, value in model.encoder_k.named_buffers():      # the key encoder keeps its own
                torch.testing.assert_close(value, key_before[name])

    method.on_epoch_end, method.on_task_start = on_epoch_end, on_task_start
    trainer.tasks = trainer.tasks[:3]                   # three tasks show both resets
    trainer.run()
    initial = snapshots[1]
    assert all(float(v.abs().sum()) == 0 for n, v in initial.items() if n.endswith("running_mean"))
    assert all(bool((v == 1).all()) for n, v in initial.items() if n.endswith("running_var"))
    assert all(int(v) == 0 for n, v in initial.items() if n.endswith("num_batches_tracked"))
    # teacher mode "code": eval during a task's first epoch, train from the second
    assert events[:4] == [(0, 0, None), (0, 1, None), (1, 0, False), (1, 1, True)]


def test_batch_without_replayed_rows_runs_no_anchor_or_teacher_forward(tmp_path):
    """As the authors' code: the student's anchor pass and the teacher's two passes run only when
    the batch holds a replayed image (counted with forward hooks)."""
    trainer, _ = make_trainer(tmp_path, "CCL")
    trainer.run()                                       # two tasks: replay exists, teacher active
    trainer.task, trainer.epoch = 1, 0
    trainer.begin_epoch()
    calls = {"student": 0, "teacher": 0}
    hooks = [trainer.model.encoder_q.register_forward_hook(lambda *_: calls.__setitem__("student", calls["student"] + 1)),
             trainer.method.teacher.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))]
    batch = next(trainer.epoch_batches())
    for old in (np.zeros(len(batch.ids), bool), np.arange(len(batch.ids)) == 3):
        batch.is_old, batch.old_host, batch.old_all_host = torch.from_numpy(old), old, old
        calls.update(student=0, teacher=0)
        result = trainer.train_step(batch)
        n_old = int(old.sum())
        assert calls == ({"student": 2, "teacher": 2} if n_old else {"student": 1, "teacher": 0})
        assert ("teacher_q" in result.details) == bool(n_old)
        assert (float(result.losses["distill"]) == 0.0) or n_old
    for hook in hooks:
        hook.remove()


def test_teacher_mode_eval_keeps_the_teacher_in_eval_mode(tmp_path):
    trainer, _ = make_trainer(tmp_path, "CCL", epochs=2, ccl_teacher_mode="eval")
    trainer.method.on_task_start(1)
    for epoch in (0, 1):
        trainer.method.on_epoch_start(1, epoch)
        assert not trainer.method.teacher.training


@pytest.mark.parametrize("method", ["Finetuning", "SimpleReplay"])
def test_methods_train_only_on_their_task_and_replay(tmp_path, method):
    audit: list[np.ndarray] = []
    trainer, plan = make_trainer(tmp_path, method)
    trainer.trained_ids = audit
    trainer.run()
    per_task = len(audit) // 2
    seen_0, seen_1 = np.concatenate(audit[:per_task]), np.concatenate(audit[per_task:])
    assert set(seen_0) <= set(plan.task_ids[0])
    replayed = set(trainer.replay[0])
    if method == "Finetuning":
        assert set(seen_1) <= set(plan.task_ids[1]) and not replayed
    else:
        assert len(trainer.replay[0]) == trainer.config.n_save * plan.classes_per_task
        assert set(seen_1) <= set(plan.task_ids[1]) | replayed
        assert replayed <= set(plan.task_ids[0])


class LabelFree:
    """A dataset whose labels cannot be read: pixels yes, targets no."""

    def __init__(self, dataset) -> None:
        self._dataset = dataset

    @property
    def targets(self):
        raise AssertionError("pretraining read the labels")

    def __len__(self) -> int:
        return len(self._dataset)

    def __getattr__(self, name):
        return getattr(self._dataset, name)


@pytest.mark.parametrize("loader", ["tensor", "workers"])
def test_pretraining_and_min_variance_selection_never_read_labels(tmp_path, loader):
    config = resolve_config(tiny_config(tmp_path, "CCL", loader=loader), 32)
    ds = open_dataset("demo")
    plan = plan_tasks(config, ds.targets, len(ds.classes))     # the class split, made up front
    run_dir = runs.prepare_run_dir(tmp_path / "run")
    trainer = Trainer(config, LabelFree(ds), plan, CPU, run_dir)
    trainer.run()
    assert trainer.task == 2 and 0 < len(trainer.replay[1]) <= config.n_save * plan.classes_per_task


def test_a_float64_step_stays_float64():
    """For numerical cross-checks against a reference run in float64: with the model, the queues
    and the batch in float64 (precision fp32, i.e. no autocast), every loss, the logits and the
    embeddings come back in float64."""
    ds = open_dataset("demo")
    config = TrainConfig(method="CCL", arch="resnet18", stem="imagenet", batch_size=16, moco_k=32, ccl_k=8,
                         n_tasks=5, n_save=2, epochs=1, seed=0, progress=False, precision="fp32",
                         device="cpu", bn_groups=2, key_bn_groups=2)
    trainer = Trainer.from_images(config, load_uint8(ds), ds.targets)
    trainer.start_task(0)
    trainer.run_epoch()
    trainer.finish_task()
    trainer.start_task(1)
    for module in (trainer.model, trainer.method.teacher, trainer.method.extra_queue):
        module.double()
    trainer.begin_epoch()
    batch = next(trainer.epoch_batches())
    batch.q, batch.k, batch.anchor = batch.q.double(), batch.k.double(), batch.anchor.double()
    old = np.arange(16) % 4 == 0
    batch.is_old, batch.old_host, batch.old_all_host = torch.from_numpy(old), old, old
    result = trainer.train_step(batch)
    assert all(v.dtype == torch.float64 for v in result.losses.values())
    assert result.logits.dtype == result.q.dtype == result.k.dtype == torch.float64
    assert float(result.losses["distill"]) > 0 and result.details["teacher_q"].dtype == torch.float64
    assert trainer.model.queue.dtype == torch.float64


@pytest.mark.parametrize("name, switch", [("CCL-no-distill", "ccl_distill"), ("CCL-no-extra-queue", "ccl_extra_queue")])
def test_an_ablation_is_ccl_with_its_switch_off(name: str, switch: str) -> None:
    """CCL taken apart: the ablation's name is a method of its own (records, rows), trained by the
    CCL class with exactly one addition switched off, whatever the config said."""
    from cclnb.config import TrainConfig
    from cclnb.training.methods import canonical_name, method_class, resolve
    from cclnb.training.methods.ccl import CCL

    config = resolve(TrainConfig(method=name.lower(), **{switch: True}))
    assert config.method == name and getattr(config, switch) is False and method_class(name) is CCL
    other = {"ccl_distill", "ccl_extra_queue"} - {switch}
    assert all(getattr(config, s) is True for s in other)
    assert resolve(TrainConfig.from_dict(config.to_dict())) == config
    assert canonical_name("CCL") == "CCL" and method_class("CLL") is CCL
