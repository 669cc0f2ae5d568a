"""The continual MoCo v2 training loop: tasks, epochs, steps, checkpoints.

`Trainer` holds one run's state and trains it: `run` walks every task of the plan, and the same
public steps it takes (`start_task`, `run_epoch` = `begin_epoch` -> `train_step` per batch ->
`end_epoch`, `finish_task`) drive it one task, epoch or step at a time from a notebook or a
numerical cross-check. The loop is method-agnostic and never names a method: a `cclnb.training.methods.Method` adds its
loss terms, its trainable modules, its replay selection and its task/epoch/step hooks. It never sees labels (the plan holds sample ids),
and the per-task evaluation is a callback prepared outside it (`Evaluator`).

Exactness of resume rests on three facts: the epoch order depends only on (seed, task, epoch);
the augmentation generator is re-seeded per epoch and its state is saved mid-epoch; every other
piece of state (weights, optimizer, queues, teacher, replay ids, counters, global RNG) is in the
checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cclnb.config import TrainConfig
from cclnb.data import load_uint8
from cclnb.data.batches import (Batch, TensorFeeder, WorkerFeeder, check_batch, epoch_entries, epoch_order,
                                steps_per_epoch)
from cclnb.data.jpeg import DecodeFeeder
from cclnb.data.prefetch import PrefetchFeeder, check_prefetch
from cclnb.errors import CheckpointError, ConfigError, Interrupted, TrainingDiverged
from cclnb.training import dist, runs
from cclnb.training.checkpoint import publish_copy, rng_state, save_checkpoint, set_rng_state
from cclnb.training.lifecycle import StopFlag
from cclnb.training.losses import at_least_fp32, info_nce_from_logits, info_nce_logits
from cclnb.training.methods import Method, StepOutputs, TrainerEnv, get_method, method_class, resolve
from cclnb.training.models import MoCo, grouped_forward, set_grouped_bn
from cclnb.training.plan import TaskPlan, plan_tasks, resolve_config
from cclnb.training.precision import autocast, emulated_bf16_note

MIN_BN_GROUP = 16   # fewer samples per BatchNorm group than this earns a note in the run log
Evaluator = Callable[[torch.nn.Module, int, str], None]   # (backbone, after_task, who)


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The authors' per-epoch LR within a task: cosine restarting each task (`--cos`), else x0.1 at
    every `--schedule` milestone."""
    if config.cos:
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.lr * 0.1 ** sum(epoch >= m for m in config.schedule)


def _generator(device: torch.device, *key: int) -> torch.Generator:
    seed = int(np.random.default_rng(list(key)).integers(2**62))
    return torch.Generator(device=device).manual_seed(seed)


def groups_per_rank(groups: int, world: int, option: str) -> int:
    """BatchNorm groups each rank holds: the global batch's `groups` emulated GPUs, shared out."""
    if groups % world:
        raise ConfigError(f"{option} {groups} emulates {groups} GPUs over the global batch and must be "
                          f"a multiple of the {world} processes; set {option} to a multiple of {world}")
    return groups // world


@dataclass
class StepResult:
    """What one training step computed, detached, on the training device."""

    losses: dict[str, torch.Tensor]    # "total", "moco", then the method's `loss_terms` (weighted), 0-dim
    logits: torch.Tensor               # (b, 1 + K) MoCo logits (column 0 the positive), / T
    q: torch.Tensor                    # (b, dim) normalized query embeddings
    k: torch.Tensor                    # (b, dim) normalized key embeddings
    details: dict[str, torch.Tensor] = field(default_factory=dict)   # the method's terms (CCL:
    #   student_anchor, teacher_q, teacher_anchor when the distillation ran)

    def values(self) -> torch.Tensor:
        """[total, moco, *terms] as one device tensor (the log's loss columns, in order)."""
        return torch.stack([value.float() for value in self.losses.values()])


class Trainer:
    """State of one pretraining run over `images_source` (an ImageDataset or a uint8 array indexed
    by sample id), and the loop that trains it. With a `run_dir`, rank 0 writes the run's log,
    checkpoints, replay ids and status there; without one nothing is written."""

    def __init__(self, config: TrainConfig, images_source, plan: TaskPlan, ctx: dist.DistContext,
                 run_dir: Path | None = None, evaluator: Evaluator | None = None) -> None:
        config = resolve(config)     # the method's name and options (idempotent)
        self.config, self.plan, self.run_dir, self.ctx = config, plan, run_dir, ctx
        self.writes = run_dir is not None and ctx.is_main    # this process owns the run directory
        self.log = runs.TrainLog(run_dir or Path("."), enabled=self.writes,
                                 columns=runs.log_columns(method_class(config.method).loss_terms),
                                 tensorboard=config.tensorboard)
        self.evaluator = evaluator
        self.device = ctx.device
        self.seed = int(config.seed)
        # every generator a checkpoint records starts from the seed, so a run (and its
        # checkpoints) depend on nothing but the config, whichever process started it
        random.seed(self.seed)
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        self.model = MoCo(config.arch, config.moco_dim, config.moco_k, config.mlp,
                          config.small_images, config.stem, config.width).to(self.device)
        if self.device.type == "cuda" and config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        set_grouped_bn(self.model, config.grouped_bn)    # the key encoder and teachers copy it
        self.model.copy_query_to_key()
        self._broadcast_model()
        self.encode_q = (torch.compile(self.model.encoder_q, mode=config.compile_mode) if config.compile
                         else self.model.encoder_q)
        self.feeder = self._make_feeder(images_source)
        self.bn_groups = groups_per_rank(config.bn_groups, ctx.world_size, "--bn-groups")
        self.key_bn_groups = groups_per_rank(config.key_bn_groups, ctx.world_size, "--key-bn-groups")
        env = TrainerEnv(config=config, model=self.model, ctx=ctx, seed=self.seed,
                         classes_per_task=plan.classes_per_task, views=self.feeder.views,
                         log=self._say, autocast=lambda: autocast(self.device, config.precision),
                         encode_q=self.encode_q, bn_groups=self.bn_groups)
        per_group = config.batch_size // max(1, config.bn_groups)
        if per_group < MIN_BN_GROUP:
            self._say(f"note: --bn-groups {config.bn_groups} normalizes over {per_group} samples per group "
                      f"(the authors: 32); statistics of so few samples are noisy and can blow the "
                      f"weights up: raise --batch-size or lower --bn-groups")
        slow = emulated_bf16_note(config.precision, self.device)
        if slow:
            self._say(slow)
        self.method: Method = get_method(config, env)
        self.loss_names = ("total", "moco", *self.method.loss_terms)
        self.method_modules = self._prepare_method_modules()
        self.optimizer = torch.optim.SGD(self._param_groups(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.tasks = self.method.training_tasks(plan.task_ids)
        self._check_replay_budget()
        self.replay: list[np.ndarray] = []
        self.task = self.epoch = self.step = self.global_step = 0
        self.generator_state: torch.Tensor | None = None
        # ([total, moco, *terms] loss sums, steps) of the epoch so far when a signal stopped it
        # mid-epoch: the resumed epoch's mean row in train_log.csv then covers the whole epoch
        self.epoch_losses: tuple[list[float], int] | None = None
        self.started = time.time()
        self.trained_ids: list[np.ndarray] | None = None    # set by tests to audit the data seen
        self.stop: StopFlag | None = None    # set while `run` trains: a signal checkpoints and stops

    @classmethod
    def from_images(cls, config: TrainConfig, images: np.ndarray, targets: np.ndarray,
                    device: torch.device | str | None = None, run_dir: str | Path | None = None
                    ) -> "Trainer":
        """A trainer over in-memory uint8 images (N, H, W, 3) in one process, for notebooks and
        tests: no dataset files, no run directory unless `run_dir` is given (then logs and
        checkpoints go there). `targets` (N,) only split the classes into tasks, as in `train`.

        Drive it with `start_task`, `epoch_batches`, `train_step` / `run_epoch`, `finish_task`, or
        train every task with `run`."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ConfigError(f"images must be a uint8 array (N, H, W, 3), got {images.dtype} "
                              f"{tuple(images.shape)}")
        if device is None:
            device = dist.resolve_device(config.device)
        device = torch.device(device)
        config = resolve_config(dataclasses.replace(config, loader="tensor"), images.shape[1], device)
        ctx = dist.DistContext(rank=0, world_size=1, local_rank=0, device=device)
        plan = plan_tasks(config, np.asarray(targets), int(np.max(targets)) + 1)
        if run_dir is not None:
            run_dir = runs.prepare_run_dir(run_dir)
        return cls(config, images, plan, ctx, run_dir)

    # ------------------------------------------------------------------ public hooks (documented order)
    def start_task(self, task: int | None = None) -> None:
        """Begin `task` (default: the current one) at epoch 0: the method's `on_task_start`
        (CCL: key encoder and teacher reset, extra queue filled at the second task)."""
        self.task = self.task if task is None else task
        self.epoch = self.step = 0
        self.generator_state = None
        self.method.on_task_start(self.task)

    def begin_epoch(self) -> float:
        """Set up epoch `self.epoch` of `self.task`: its learning rate, the model in train mode, the
        method's `on_epoch_start` (CCL: the teacher's mode). Returns the learning rate."""
        lr = learning_rate(self.config, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._train_mode()
        self.method.on_epoch_start(self.task, self.epoch)
        return lr

    def _train_mode(self) -> None:
        self.model.train()
        for module in self.method_modules.values():
            module.train()

    def end_epoch(self) -> None:
        """Close epoch `self.epoch`: the method's `on_epoch_end` (CCL: the teacher's EMA), then
        move to the next epoch."""
        self.method.on_epoch_end(self.task, self.epoch)
        self.epoch += 1
        self.step = 0
        self.generator_state = None

    def epoch_batches(self, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """The batches the loop trains on in epoch `self.epoch` of `self.task` (this rank's share),
        from step `self.step` on; augmented with `generator` (default: the epoch's own)."""
        entries = self._entries()
        generator = generator if generator is not None else self.epoch_generator()
        order = epoch_order(len(entries[0]), self.seed, self.task, self.epoch)
        return self.feeder.batches(entries, order, self.config.batch_size, self.ctx.rank,
                                   self.ctx.world_size, self.step, generator)

    def epoch_generator(self) -> torch.Generator:
        """The augmentation and key-shuffle generator of the current epoch, seeded by (seed, task,
        epoch, rank), so a resumed epoch draws what the interrupted one would have."""
        return _generator(self.device, self.seed, self.task, self.epoch, self.ctx.rank)

    def run_epoch(self, keep_results: bool = True) -> list["StepResult"]:
        """Epoch `self.epoch` of `self.task` in the documented order: `begin_epoch`, `train_step` on
        every batch of `epoch_batches` (from step `self.step`, with the generator state a
        mid-epoch checkpoint saved), `end_epoch`. Losses are checked and logged every `print_freq`
        steps; while `run` trains, a signal checkpoints and stops at the next step. Returns every
        step's result (`keep_results=False`: none, as `run` asks, since a step's logits are
        batch x (1 + K) floats)."""
        cfg, t, e, ctx = self.config, self.task, self.epoch, self.ctx
        lr = self.begin_epoch()
        generator = self.epoch_generator()
        if self.generator_state is not None:
            generator.set_state(self.generator_state)
        n_steps = steps_per_epoch(len(self._entries()[0]), cfg.batch_size)
        bar = tqdm(total=n_steps, initial=self.step, desc=f"task {t} epoch {e}", unit="step",
                   disable=not (cfg.progress and ctx.is_main), leave=False, dynamic_ncols=True)
        sums, count = ((np.array(self.epoch_losses[0]), self.epoch_losses[1]) if self.epoch_losses
                       else (np.zeros(len(self.loss_names)), 0))
        self.epoch_losses = None
        window_start, window_steps = time.time(), 0
        # Loss values stay on the device and reach the host every `print_freq` steps, in one copy:
        # a copy per step would make the CPU wait for the GPU and stop it from queuing the next
        # batch's augmentation, which at 32 px costs a large part of the throughput.
        pending: list[torch.Tensor] = []
        results: list[StepResult] = []
        for batch in self.epoch_batches(generator):
            result = self.train_step(batch, generator)
            pending.append(result.values())
            if keep_results:
                results.append(result)
            if self.trained_ids is not None:
                self.trained_ids.append(batch.ids.numpy())
            self.step += 1
            self.global_step += 1
            window_steps += 1
            bar.update(1)
            if self.step % cfg.print_freq == 0:
                values = self._check_losses(pending)
                pending = []
                sums += values.sum(axis=0)
                count += len(values)
                speed = window_steps * cfg.batch_size / max(time.time() - window_start, 1e-9)
                bar.set_postfix(loss=f"{values[-1, 0]:.4f}", img_s=f"{speed:.0f}")
                self._log_row(values[-1], lr, speed)
                window_start, window_steps = time.time(), 0
            # after the step's row: a stop at a logged step keeps that row (the resume starts after it)
            if self.stop is not None and dist.any_rank(self.stop.signal is not None, ctx):
                self.generator_state = generator.get_state()
                if pending:
                    values = self._check_losses(pending)
                    sums, count = sums + values.sum(axis=0), count + len(values)
                self.epoch_losses = ([float(v) for v in sums], count)
                self._interrupt(bar)
        if pending:
            values = self._check_losses(pending)
            sums += values.sum(axis=0)
            count += len(values)
        bar.close()
        if count:
            speed = window_steps * cfg.batch_size / max(time.time() - window_start, 1e-9)
            self._log_row(sums / count, lr, speed)
            parts = ", ".join(f"{name} {v / count:.4f}" for name, v in zip(self.loss_names[1:], sums[1:]))
            self._say(f"task {t} epoch {e}: loss {sums[0] / count:.4f} ({parts}) lr {lr:.4g}")
        self.end_epoch()
        return results

    def finish_task(self) -> np.ndarray:
        """End the current task: the method's replay selection (ids kept in `self.replay`), the
        per-task evaluation when the trainer has one, and (with a run directory) the replay ids
        and the task checkpoint written; then the next task is current. Returns the ids kept.

        A kill anywhere in here resumes from the last epoch checkpoint and redoes this (selection
        and evaluation are seeded)."""
        t = self.task
        ids = self.method.select_replay(t, self.tasks[t]) if self.ctx.is_main else None
        if self.ctx.distributed:
            box = [ids]
            torch.distributed.broadcast_object_list(box, src=0)
            ids = box[0]
        ids = np.asarray(ids, dtype=np.int64)
        self.replay.append(ids)
        if self.writes:
            runs.write_replay(self.run_dir, t, ids, self.method.selection)
        if self.method.uses_replay:
            self._say(f"task {t}: replay keeps {len(ids)} ids ({len(np.unique(ids))} distinct, "
                      f"selection {self.method.selection})")
        self._evaluate(t)
        self.task, self.epoch, self.step = t + 1, 0, 0
        self.save(task_end=True)
        self.status("running")
        dist.barrier(self.ctx)
        return ids

    # ------------------------------------------------------------------ set-up
    def _make_feeder(self, images_source) -> TensorFeeder | WorkerFeeder | DecodeFeeder | PrefetchFeeder:
        cfg, small = self.config, self.config.small_images
        blur = not small
        if cfg.prefetch:
            check_prefetch(cfg.loader, self.device)
        if cfg.loader == "tensor":
            ids = self.plan.all_ids
            images = (images_source[ids] if isinstance(images_source, np.ndarray) else
                      load_uint8(images_source, ids=ids, progress=cfg.progress and self.ctx.is_main))
            feeder = TensorFeeder(images, ids, cfg.image_size, blur, small, self.device)
        elif cfg.loader == "decode":
            feeder = DecodeFeeder(images_source, cfg.image_size, blur, small, self.device)
        else:
            return WorkerFeeder(images_source, cfg.image_size, blur, small, cfg.workers, self.device)
        return PrefetchFeeder(feeder, self.device, cfg.channels_last) if cfg.prefetch else feeder

    def _prepare_method_modules(self) -> dict[str, torch.nn.Module]:
        """The method's trainable modules on the training device (channels_last like the model
        where it applies), broadcast from rank 0 as the model is, and counted in the run log."""
        modules = self.method.trainable_modules()
        for name, module in modules.items():
            module.to(self.device)
            if self.device.type == "cuda" and self.config.channels_last:
                module.to(memory_format=torch.channels_last)
            if self.ctx.distributed:
                for tensor in module.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
        counts = {"encoder": _n_parameters(self.model.encoder_q),
                  **{name: _n_parameters(module) for name, module in modules.items()}}
        self.trainable_parameters = sum(counts.values())
        self.log.line("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        return modules

    def _param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the query encoder, then each of the method's
        trainable modules (same hyper-parameters; a group per module keeps them apart in the
        optimizer's state). Without method modules this is the authors' single group."""
        return [{"params": list(self.model.encoder_q.parameters())},
                *({"params": list(m.parameters())} for m in self.method_modules.values())]

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimizer steps (DDP averages their gradients)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _check_replay_budget(self) -> None:
        """A draw without replacement cannot keep more distinct ids than a task has: refuse now,
        not after the first task's training."""
        if self.method.selection != "random" or self.config.replay_with_replacement:
            return
        budget = self.method.replay_budget()
        sizes = [len(ids) for ids in self.tasks]
        t = int(np.argmin(sizes))
        if budget > sizes[t]:
            raise ConfigError(
                f"--replay-without-replacement keeps n_save * C/n = {budget} distinct images of every "
                f"task, but task {t} has only {sizes[t]}; lower --n-save to at most "
                f"{sizes[t] // self.plan.classes_per_task} or drop --replay-without-replacement "
                f"(the authors draw with replacement)")

    def _broadcast_model(self) -> None:
        """Every rank starts from rank 0's weights (DDP does the same at wrap time)."""
        if self.ctx.distributed:
            for tensor in self.model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def _say(self, message: str) -> None:
        self.log.line(message)
        if self.ctx.is_main and self.config.progress:
            tqdm.write(message)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        method_state = self.method.state_dict()
        # "teacher" also at the top level: `checkpoint.backbone_state_dict(..., who="teacher")`
        # reads it there (torch.save stores the shared tensors once).
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "method": method_state, "teacher": method_state.get("teacher"),
                "method_modules": {name: m.state_dict() for name, m in self.method_modules.items()},
                "replay": [torch.from_numpy(r.astype(np.int64)) for r in self.replay],
                "task": self.task, "epoch": self.epoch, "step": self.step,
                "global_step": self.global_step, "seed": self.seed,
                "generator": self.generator_state, "rng": rng_state(),
                "epoch_losses": self.epoch_losses, "config": self.config.to_dict()}

    def load(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        saved_modules = ckpt.get("method_modules") or {}     # absent before the method API: none
        if set(saved_modules) != set(self.method_modules):
            raise CheckpointError(f"the checkpoint holds the method modules {sorted(saved_modules)}, but "
                                  f"{self.config.method} trains {sorted(self.method_modules)}; resume it "
                                  f"with the method (and --method-module) that wrote it")
        for name, module in self.method_modules.items():
            module.load_state_dict(saved_modules[name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.method.load_state_dict(ckpt["method"])
        self.replay = [r.numpy().astype(np.int64) for r in ckpt["replay"]]
        self.task, self.epoch, self.step = int(ckpt["task"]), int(ckpt["epoch"]), int(ckpt["step"])
        self.global_step = int(ckpt["global_step"])
        self.generator_state = ckpt["generator"]
        self.epoch_losses = _loss_sums(ckpt.get("epoch_losses"), self.loss_names)
        set_rng_state(ckpt["rng"])
        self.log.discard_after(self.global_step)
        self._say(f"resumed at task {self.task} epoch {self.epoch} step {self.step}")

    def save(self, task_end: bool = False) -> None:
        """checkpoints/last.pt (and task_<t>.pt at a task end), rank 0 only, atomically.

        task_<t>.pt is written first: a kill between the two writes leaves last.pt at the previous
        epoch, so the resume redoes the task's end and writes task_<t>.pt. The other order would
        let last.pt say the task is done while task_<t>.pt never gets written. At a task end
        last.pt is then published from task_<t>.pt (the same state, serialized once)."""
        if not self.writes:
            return
        state = self.state()
        last = runs.checkpoint_path(self.run_dir)
        if task_end:
            task_file = runs.checkpoint_path(self.run_dir, self.task - 1)
            save_checkpoint(state, task_file)
            publish_copy(task_file, last)
        else:
            save_checkpoint(state, last)

    def status(self, state: str, **extra: Any) -> None:
        """status.json: the run's state and position (rank 0, with a run directory)."""
        if self.writes:
            runs.write_status(self.run_dir, state, task=self.task, epoch=self.epoch, step=self.step,
                              global_step=self.global_step, n_tasks=len(self.tasks), **extra)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Train every remaining task (from where `load` left the state), checkpointing every
        `save_every` epochs and at every task end; SIGTERM/SIGINT save and raise `Interrupted`."""
        if not self.config.aug_plus:
            self.log.line("note: --aug-plus not given; cclnb always uses MoCo v2's augmentation "
                          "(the authors' MoCo v1 augmentation is not implemented)")
        self.status("running")
        with StopFlag() as self.stop:
            try:
                while self.task < len(self.tasks):
                    self._run_task()
            finally:
                self.stop = None
        self.status("complete")
        self._say(f"run complete: {self.run_dir}")

    def _entries(self) -> tuple[np.ndarray, np.ndarray]:
        old = (np.concatenate(self.replay) if self.method.uses_replay and self.replay
               else np.zeros(0, dtype=np.int64))
        return epoch_entries(self.tasks[self.task], old)

    def _run_task(self) -> None:
        t, cfg = self.task, self.config
        entries = self._entries()
        check_batch(len(entries[0]), cfg.batch_size, self.ctx.world_size, t)
        if self.epoch == 0 and self.step == 0:
            self.start_task(t)
            self._say(f"task {t}: {len(self.tasks[t])} images + {int(entries[1].sum())} replayed")
        while self.epoch < cfg.epochs:
            self.run_epoch(keep_results=False)
            if cfg.save_every and self.epoch % cfg.save_every == 0 and self.epoch < cfg.epochs:
                self.save()
                self.status("running")
        self.finish_task()

    def _evaluate(self, t: int) -> None:
        """Per-task evaluation on rank 0, with the global RNG saved and restored around it so
        that measuring a run never changes how it trains."""
        if self.evaluator is not None:
            saved = rng_state()
            self.evaluator(self.model.encoder_q.backbone, t, "student")
            teacher = self.method.teacher_encoder()
            if self.config.eval_teacher and teacher is not None:
                self.evaluator(teacher.backbone, t, "teacher")
            set_rng_state(saved)
            self._train_mode()
        dist.barrier(self.ctx)

    def _check_losses(self, pending: list[torch.Tensor]) -> np.ndarray:
        """The pending steps' [total, moco, *terms] on the host (one sync), (n, terms + 2).

        A NaN/inf total stops the run naming the first bad step. The steps after it in the window
        have already updated the weights in memory, but nothing is saved before this check (every
        checkpoint write comes after one), so the newest checkpoint on disk is the last good one.
        """
        values = torch.stack(pending).float().cpu().numpy().astype(float)
        bad = ~np.isfinite(values[:, 0])
        if dist.any_rank(bool(bad.any()), self.ctx):
            first = int(np.argmax(bad)) if bad.any() else len(values) - 1
            kept = (f"; the last good checkpoint {runs.checkpoint_path(self.run_dir)} is kept (if any)"
                    if self.run_dir is not None else "")
            raise TrainingDiverged(
                f"the loss became {values[first, 0]} at task {self.task}, epoch {self.epoch}, "
                f"step {self.step - len(values) + first}{kept}. Lower --lr, use "
                f"--precision fp32, or check the data")
        return values

    def train_step(self, batch: Batch, generator: torch.Generator | None = None) -> "StepResult":
        """One MoCo v2 step (+ the method's terms): forward, backward, SGD step, queue updates.

        Every train-mode forward normalizes per BatchNorm slice (`bn_groups`, the authors'
        per-GPU statistics); the keys are shuffled first (`key_bn_groups`). Returns the losses,
        logits and embeddings as device tensors, without waiting for the device (`_check_losses`
        brings a window of losses to the host). `cclnb bench` times this method. `generator`
        (default: the current epoch's) draws the key shuffle.
        """
        cfg, model, ctx = self.config, self.model, self.ctx
        if cfg.compile and cfg.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()   # a new step: last step's graph outputs may be reused
        generator = generator if generator is not None else self.epoch_generator()
        batch = self.method.before_step(self.task, batch, generator)
        if self.device.type == "cuda" and cfg.channels_last:
            batch.q = batch.q.contiguous(memory_format=torch.channels_last)
            batch.k = batch.k.contiguous(memory_format=torch.channels_last)
            batch.anchor = batch.anchor.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, cfg.precision):
            embedding = grouped_forward(model.encoder_q, batch.q, self.bn_groups, True, self.encode_q)
            (z,) = at_least_fp32(embedding)
            q = F.normalize(z, dim=1)
            with torch.no_grad():
                model.momentum_update(cfg.moco_m)
                if ctx.distributed:
                    k = dist.shuffled_key_forward(
                        lambda x: model.key_embed(x, self.key_bn_groups), batch.k, ctx, generator)
                else:
                    k = model.key_forward(batch.k, self.key_bn_groups, generator)
                (k,) = at_least_fp32(k)
            logits = info_nce_logits(q, k, model.queue, cfg.moco_t)
            loss_moco = info_nce_from_logits(logits)
            outputs = StepOutputs(q=q, k=k, z=z)
            extras = self.method.extra_losses(self.task, batch, outputs)
        unknown = set(extras) - set(self.method.loss_terms)
        if unknown:
            raise ConfigError(f"method {cfg.method} returned the loss terms {sorted(unknown)} that its "
                              f"`loss_terms` {self.method.loss_terms} does not declare; add them there")
        zero = loss_moco.new_zeros(())
        terms = {name: extras.get(name, zero) for name in self.method.loss_terms}
        loss = loss_moco
        for value in terms.values():
            loss = loss + value
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self._trained_parameters(), ctx)
        self.optimizer.step()
        if ctx.distributed:
            dist.broadcast_buffers(model.encoder_q, ctx)
            dist.broadcast_buffers(model.encoder_k, ctx)
            for module in (*self.method.synced_modules(), *self.method_modules.values()):
                dist.broadcast_buffers(module, ctx)
        keys_all = dist.all_gather_cat(k.detach(), ctx)
        old_all = dist.all_gather_cat(batch.is_old, ctx)
        model.enqueue(keys_all)
        self.method.after_step(batch, keys_all, old_all)
        losses = {"total": loss, "moco": loss_moco, **terms}
        return StepResult(losses={name: value.detach() for name, value in losses.items()},
                          logits=logits.detach(), q=q.detach(), k=k, details=outputs.details)

    def _interrupt(self, bar) -> None:
        bar.close()
        self.save()
        self.status("interrupted")
        raise Interrupted(f"stopped by a signal at task {self.task}, epoch {self.epoch}, step {self.step}; "
                          f"the state is saved in {runs.checkpoint_path(self.run_dir)}. Continue with "
                          f"`cclnb train ... --resume {self.run_dir}` (the same options)")

    def _log_row(self, values: np.ndarray, lr: float, speed: float) -> None:
        losses = {("loss" if name == "total" else f"loss_{name}"): float(v)
                  for name, v in zip(self.loss_names, values)}
        self.log.row({"task": self.task, "epoch": self.epoch, "step": self.step,
                      "global_step": self.global_step, **losses, "lr": lr, "img_per_s": speed,
                      "time_s": time.time() - self.started})




def _n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _loss_sums(saved: tuple[list[float], int] | None, names: tuple[str, ...]
               ) -> tuple[list[float], int] | None:
    """A checkpoint's mid-epoch loss sums, in `names`' order. Checkpoints written before methods
    named their terms hold [total, moco, extra, distill] whatever the method: the terms a method
    does not have were zeros there and are dropped. (Absent before 2026-12: the mean restarts.)"""
    if saved is None or len(saved[0]) == len(names):
        return saved
    legacy = dict(zip(("total", "moco", "extra", "distill"), saved[0]))
    if len(saved[0]) != len(legacy) or not set(names) <= set(legacy):
        raise CheckpointError(f"the checkpoint's loss sums {saved[0]} do not match the terms {names}; "
                              f"resume it with the method that wrote it")
    return [legacy[name] for name in names], saved[1]
