"""The paper's linear evaluation: a new linear layer on a frozen encoder, trained with SGD.

Faithful to the authors' `lincls_eval.py` where it matters: the backbone stays in eval mode
(BatchNorm statistics never change) with no gradients, the new fc is initialised normal(0, 0.01)
with zero bias, SGD (lr 30, momentum 0.9, no weight decay, batch 256) for 100 epochs with the LR
x0.1 at epochs 60 and 80, training views RandomResizedCrop(224, scale 0.08-1) + flip and val
views resize 256 + centre crop 224. Different on purpose:

* The result is the **final** epoch's top-1/top-5; the best epoch's top-1 is also recorded but
  labelled "best epoch (selected on val), as the authors report", since choosing an epoch on the
  test set inflates the number.
* One process on one device (CPU or one GPU): no hard-coded 8 GPUs.
* Small images (all the same size, <= 64 px; e.g. Tiny-ImageNet at 32 px) use the same operation
  at native resolution: RandomResizedCrop(size, scale 0.08-1) + flip for training (batched on the
  device, `cclnb.data.augment.BatchLinclsAugment`), the plain image for val (resize 256/crop 224 of a
  native-size image scaled down to 32 px keeps ~88% of it; we keep all of it, as the anchor view).
  The uint8 images live on the device; only the augmentation and the frozen forward run per step.
* Val features do not depend on the epoch (no augmentation, frozen eval-mode backbone), so they
  are extracted once and every epoch's validation is one matrix product; the training features
  are recomputed every epoch because the augmentation changes.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cclnb.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from cclnb.evaluate.features import extract_features, frozen
from cclnb.training.checkpoint import write_atomically
from cclnb.training.precision import autocast, resolve_model_precision

BEST_NOTE = "best epoch (selected on val), as the authors report"
AUTO_RESUME = "auto"   # --resume auto: each encoder continues from its own lincls_<who>.pt if there is one
SMALL_MAX = 64


@dataclass
class Source:
    """Where the encoder comes from and where results go."""

    checkpoint: Path | None     # None: a randomly initialised backbone (a baseline)
    run_config: dict[str, Any]  # the pretraining run's config.json, {} if not from a run
    out_dir: Path


def resolve_source(pretrained: str | None, out: str | None) -> Source:
    """Map `--pretrained` (run directory, checkpoint file or nothing) to a `Source`.

    A run directory means its checkpoints/last.pt; a checkpoint inside a run directory also brings
    that run's config.json, whose arch/stem/data serve as defaults. Results go to `--out`, else the
    run directory, else the checkpoint's folder, else the current folder.
    """
    from cclnb.training.runs import checkpoint_path, read_config

    if not pretrained:
        return Source(None, {}, Path(out or "."))
    path = Path(pretrained).expanduser()
    if path.is_dir():
        run_dir, ckpt = path, checkpoint_path(path)
        if not ckpt.is_file():
            raise CheckpointError(f"--pretrained {path}: the run directory has no checkpoints/last.pt; "
                                  f"pass a finished run or a checkpoint file")
    elif path.is_file():
        ckpt = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        if not (run_dir / "config.json").is_file():
            run_dir = None
    else:
        raise CheckpointError(f"--pretrained {pretrained}: no such file or run directory")
    config = read_config(run_dir) if run_dir is not None else {}
    return Source(ckpt, config, Path(out) if out else (run_dir or ckpt.parent))


def resolved_settings(args: argparse.Namespace, run_config: dict[str, Any]) -> dict[str, Any]:
    """Flags the user left unset take the pretraining run's values, then the authors' defaults."""
    def pick(name: str, default: Any) -> Any:
        for value in (getattr(args, name), run_config.get(name)):
            if value is not None:
                return value
        return default

    return {"arch": pick("arch", "resnet50"), "stem": pick("stem", "auto"), "width": pick("width", 64),
            "data": pick("data", None),
            "dataset": pick("dataset", "auto"), "image_size": pick("image_size", None),
            "imagenetsub": bool(args.imagenetsub or run_config.get("imagenetsub", False)),
            "classes": pick("classes", None)}


def resident(ds, image_size: int) -> bool:
    """Whether `ds` takes the small-image fast path: equal-size images <= 64 px kept as uint8 on
    the device, evaluated at <= 64 px."""
    return ds.image_size is not None and ds.image_size <= SMALL_MAX and image_size <= SMALL_MAX


def lr_at(epoch: int, lr: float, schedule: list[int]) -> float:
    """The authors' step schedule: x0.1 at every milestone the epoch has reached."""
    return lr * 0.1 ** sum(epoch >= m for m in schedule)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracy in percent for each k (k capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == y.view(-1, 1)
    return [float(hits[:, :k].any(dim=1).double().mean() * 100.0) for k in ks]


def _device(args: argparse.Namespace) -> torch.device:
    from cclnb.training.dist import resolve_device

    if args.world_size is not None and args.world_size > 1:
        raise ConfigError(f"--world-size {args.world_size}: cclnb's linear evaluation runs in one process "
                          f"on one device (a frozen backbone needs no more); drop the distributed flags")
    device = resolve_device(args.device)
    if args.gpu is not None and device.type == "cuda":
        device = torch.device("cuda", args.gpu)
        torch.cuda.set_device(device)
    return device


def load_backbone(source: Source, settings: dict[str, Any], small_images: bool, who: str,
                  device: torch.device) -> nn.Module:
    """The frozen backbone (eval mode, no gradients) with the student's or teacher's weights;
    `settings` (`resolved_settings`) name its arch, stem and width."""
    from cclnb.training.checkpoint import backbone_state_dict
    from cclnb.training.models import build_backbone

    arch, stem = settings["arch"], settings["stem"]
    backbone = build_backbone(arch, small_images, stem, settings["width"])
    if source.checkpoint is not None:
        state = backbone_state_dict(str(source.checkpoint), who)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{source.checkpoint} does not fit a {arch} backbone (stem {stem}): "
                                  f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}; "
                                  f"pass the -a/--arch, --stem and --width it was trained with")
    backbone.requires_grad_(False)
    return backbone.to(device).eval()


class TrainViews:
    """The augmented training batches of one epoch, on the device, in a seeded random order.

    Small images: uint8 tensors resident on the device + `BatchLinclsAugment`. Otherwise PIL
    images through `lincls_train_transform` in DataLoader workers (the authors' pipeline).
    """

    def __init__(self, train, ids: np.ndarray, image_size: int, batch_size: int, workers: int,
                 device: torch.device, seed: int, progress: bool) -> None:
        from cclnb.data import load_uint8

        self.train, self.ids, self.batch_size, self.device = train, ids, batch_size, device
        self.image_size, self.workers, self.seed = image_size, workers, seed
        self.labels = torch.as_tensor(train.targets[ids], device=device)
        self.fast = resident(train, image_size)
        if self.fast:
            from cclnb.data.augment import BatchLinclsAugment

            self.images = torch.from_numpy(load_uint8(train, progress=progress, ids=ids)).to(device)
            self.augment = BatchLinclsAugment(image_size)

    def steps(self) -> int:
        return math.ceil(len(self.ids) / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.ids), generator=generator)
        if self.fast:
            aug_gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + epoch)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size].to(self.device)
                yield self.augment(self.images[idx], aug_gen), self.labels[idx]
            return
        from cclnb.data.augment import lincls_train_transform

        dataset = _Subset(self.train, self.ids, lincls_train_transform(self.image_size))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, sampler=order.tolist(), num_workers=self.workers,
            pin_memory=self.device.type == "cuda", worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def _seed_worker(worker_id: int) -> None:
    """Seed Python's `random` (used by torchvision transforms on PIL images) per worker."""
    random.seed(torch.initial_seed() % 2**32)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, dataset, ids: np.ndarray, transform) -> None:
        self.dataset, self.ids, self.transform = dataset, ids, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.ids[i])
        return self.transform(self.dataset.load_pil(j)), int(self.dataset.targets[j])


def _load_state(path: str, who: str, n_classes: int, out_dim: int) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"--resume {path}: cannot read it ({error}); pass a lincls_<who>.pt "
                              f"written by `cclnb lincls`") from error
    if not isinstance(state, dict) or "fc" not in state:
        raise CheckpointError(f"--resume {path} is not a cclnb lincls state (no 'fc'); pass the "
                              f"lincls_<who>.pt that `cclnb lincls` writes next to its JSON")
    shape = tuple(state["fc"]["weight"].shape)
    if shape != (n_classes, out_dim) or state.get("who", who) != who:
        raise CheckpointError(f"--resume {path} holds a {state.get('who')} classifier of shape {shape}; "
                              f"this evaluation needs the {who}'s ({n_classes}, {out_dim})")
    return state


@dataclass
class _EvalInputs:
    """What both final protocols start from: whose weights, where they come from and where the
    result goes, the datasets, the training ids and the evaluation image size."""

    who: str
    source: Source
    settings: dict[str, Any]
    device: torch.device
    train: Any
    val: Any
    ids: np.ndarray
    image_size: int


def _eval_inputs(args: argparse.Namespace) -> _EvalInputs:
    from cclnb.data import open_dataset, subset_per_class

    source = resolve_source(args.pretrained, args.out)
    settings = resolved_settings(args, source.run_config)
    train, val = (open_dataset(settings["data"], split, settings["dataset"], settings["imagenetsub"],
                               classes=settings["classes"])
                  for split in ("train", "val"))
    if train.classes != val.classes:
        raise DataError(f"train and val class lists differ ({len(train.classes)} vs {len(val.classes)} "
                        f"classes); every class needs a folder in both splits")
    ids = (subset_per_class(train.targets, args.subset_per_class) if args.subset_per_class
           else np.arange(len(train)))
    native = train.image_size if train.image_size is not None else 224
    image_size = settings["image_size"] or (native if native <= SMALL_MAX else 224)
    device = _device(args)
    # the result records the resolved precision
    args.precision = resolve_model_precision(args.precision, device, settings["stem"], image_size <= SMALL_MAX,
                                             image_size)
    return _EvalInputs("teacher" if args.use_teacher_weight else "student", source, settings,
                       device, train, val, ids, image_size)


def check_arguments(args: argparse.Namespace) -> None:
    """The checks of `linear_eval`'s flags that need neither data nor weights: `cclnb study` runs
    them before any notebook starts (`cclnb.study.preflight`)."""
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ConfigError(f"need --epochs >= 1, -b/--batch-size >= 1 and --lr > 0; got {args.epochs}, "
                          f"{args.batch_size}, {args.lr}")
    if args.evaluate and not args.resume:
        raise ConfigError("-e/--evaluate scores a trained classifier: pass --resume lincls_<who>.pt "
                          "(a fresh classifier is random)")


def check_probe_size(image_size: int) -> None:
    """The fast probe holds every decoded image in memory: small images only (`cclnb study`
    checks a run's size before its notebooks start)."""
    if image_size > SMALL_MAX:
        raise ConfigError(f"the fast probe decodes every image into memory and is meant for images "
                          f"<= {SMALL_MAX} px; this run uses {image_size} px: use the lincls protocol (--protocol lincls)")


@dataclass
class _Head:
    """One encoder under the linear protocol: where it comes from, its frozen backbone, its own
    classifier and optimizer, its val features and its curve so far."""

    inputs: _EvalInputs
    args: argparse.Namespace          # its own arguments (its --pretrained, its resolved precision)
    backbone: nn.Module
    buffers_before: dict[str, torch.Tensor]
    fc: nn.Linear
    optimizer: torch.optim.SGD
    state_path: Path
    curve: list[dict[str, float]]
    start_epoch: int
    val_f: torch.Tensor
    val_y: torch.Tensor
    epoch_s: list[float] = field(default_factory=list)   # wall time of each epoch this command trained

    def score(self) -> tuple[float, float]:
        with torch.no_grad():
            return tuple(topk_correct(self.fc(self.val_f), self.val_y))  # type: ignore[return-value]


def encoder_arguments(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The arguments of every encoder `args` evaluates: `--pretrained` (with `--use-teacher-weight`),
    then each `--also PATH[:student|:teacher]`, which writes to its own run directory."""
    if not args.also:
        return [args]
    if args.resume not in ("", AUTO_RESUME) or args.evaluate or args.out:
        raise ConfigError("--also trains several classifiers in one pass, each written next to its encoder: "
                          "drop -e/--evaluate and --out, and resume with --resume auto (each encoder from its "
                          "own lincls_<who>.pt), or evaluate one encoder at a time")
    encoders = [args]
    for spec in args.also:
        path, _, who = spec.rpartition(":") if spec.endswith((":student", ":teacher")) else (spec, "", "student")
        encoders.append(argparse.Namespace(**{**vars(args), "pretrained": path, "also": [],
                                              "use_teacher_weight": who == "teacher"}))
    return encoders


def linear_eval(args: argparse.Namespace) -> dict[str, Any]:
    """`linear_evals`' result of the `--pretrained` encoder (the one result without `--also`)."""
    return linear_evals(args)[0]


def linear_evals(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the linear protocol described in the module docstring; returns the result dict and
    writes `lincls_<student|teacher>.json` (plus `lincls_<who>.pt` for --resume) to the output
    folder. With -e/--evaluate, only scores the classifier restored by --resume.

    With `--also`, more encoders train their own classifiers in the same pass: each batch is read,
    decoded and augmented once and goes through every frozen encoder. The batches depend only on
    the seed and the epoch, and each classifier starts from the same seeded draw as alone, so every
    result equals that encoder's own run (tests/test_lincls.py); what is saved is the input work
    of all but one. Returns one result per encoder, `--pretrained`'s first."""
    from cclnb.training.runs import write_json

    started = time.time()
    check_arguments(args)
    arguments = encoder_arguments(args)
    encoders = [_eval_inputs(a) for a in arguments]
    first = encoders[0]
    for other in encoders[1:]:
        _check_same_inputs(first, other)
    for inputs, own in zip(encoders, arguments):
        if own.resume == AUTO_RESUME:     # each encoder from the state its own stopped run saved, if any
            state = inputs.source.out_dir / f"lincls_{inputs.who}.pt"
            own.resume = str(state) if state.is_file() else ""
    train, ids, image_size, device = first.train, first.ids, first.image_size, first.device
    seed = 0 if args.seed is None else int(args.seed)
    workers = max(0, min(args.workers, os.cpu_count() or 1))
    progress = not args.no_progress
    val = _uint8(first.val, progress) if resident(first.val, image_size) else first.val
    heads = [_head(inputs, own, seed, workers, val, progress) for inputs, own in zip(encoders, arguments)]
    if len({head.start_epoch for head in heads}) > 1:
        raise ConfigError("--resume auto: the encoders' saved states stopped at different epochs ("
                          + ", ".join(f"{h.inputs.who} of {h.inputs.source.out_dir}: {h.start_epoch}" for h in heads)
                          + "); one pass trains them together: evaluate them apart, or delete the states to restart")
    if args.evaluate:
        top1, top5 = heads[0].score()
        print(f"lincls ({first.who}) evaluate: top-1 {top1:.2f}  top-5 {top5:.2f}")
        return [{"who": first.who, "top1": top1, "top5": top5}]

    views = TrainViews(train, ids, image_size, args.batch_size, workers, device, seed, progress)
    for head in heads:
        head.inputs.source.out_dir.mkdir(parents=True, exist_ok=True)
    names = ", ".join(h.inputs.who for h in heads) if len(heads) > 1 else first.who
    bar = tqdm(range(heads[0].start_epoch, args.epochs), desc=f"lincls {names}", unit="epoch", disable=not progress)
    for epoch in bar:
        tic = time.perf_counter()
        for head in heads:
            for group in head.optimizer.param_groups:
                group["lr"] = lr_at(epoch, args.lr, args.schedule)
        totals, seen = [0.0] * len(heads), 0
        for step, (images, labels) in enumerate(tqdm(views.epoch(epoch), total=views.steps(), leave=False,
                                                     desc=f"epoch {epoch + 1}", disable=not progress)):
            losses = [_train_step(head, images, labels, device) for head in heads]
            for i, loss_value in enumerate(losses):
                totals[i] += loss_value * labels.shape[0]
                if not math.isfinite(totals[i]):
                    raise TrainingDiverged(f"linear evaluation loss became {totals[i]} at epoch {epoch + 1}; "
                                           f"lower --lr (now {args.lr})")
            seen += labels.shape[0]
            if step % max(1, args.print_freq) == 0:
                bar.set_postfix(loss=f"{losses[0]:.3f}")
        seconds = time.perf_counter() - tic        # every step read its loss: the device is done
        for head, total in zip(heads, totals):
            head.epoch_s.append(seconds)
            top1, top5 = head.score()
            head.curve.append({"epoch": epoch + 1, "train_loss": total / seen, "val_top1": top1, "val_top5": top5})
            write_atomically({"who": head.inputs.who, "epoch": epoch + 1, "fc": head.fc.state_dict(),
                              "optimizer": head.optimizer.state_dict(), "curve": head.curve},
                             head.state_path, "lincls state")
        bar.set_postfix(loss=f"{totals[0] / seen:.3f}", top1=f"{heads[0].curve[-1]['val_top1']:.2f}")

    results = []
    for head in heads:
        _check_frozen(head)
        result = _result(head, started, workers)
        write_json(head.inputs.source.out_dir / f"lincls_{head.inputs.who}.json", result)
        results.append(result)
    return results


def _check_same_inputs(first: _EvalInputs, other: _EvalInputs) -> None:
    """Encoders of one pass read one dataset at one size on one device."""
    mine = (first.train.name, len(first.train), first.image_size, first.device)
    theirs = (other.train.name, len(other.train), other.image_size, other.device)
    if mine != theirs or not np.array_equal(first.ids, other.ids):
        raise ConfigError(f"--also {other.source.checkpoint}: its run evaluates on {theirs[0]} ({theirs[1]} images, "
                          f"{theirs[2]} px), the first encoder's on {mine[0]} ({mine[1]} images, {mine[2]} px); "
                          f"one pass reads one dataset: evaluate it in a command of its own")


def _head(inputs: _EvalInputs, args: argparse.Namespace, seed: int, workers: int, val: Any,
          progress: bool) -> _Head:
    """An encoder ready to train its classifier: the seeded draw of a run of its own (the global
    seed set just before its backbone and classifier are built), restored from --resume if given."""
    torch.manual_seed(seed)
    backbone = load_backbone(inputs.source, inputs.settings, inputs.image_size <= SMALL_MAX, inputs.who,
                             inputs.device)
    buffers_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    fc = nn.Linear(backbone.out_dim, len(inputs.train.classes)).to(inputs.device)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    optimizer = torch.optim.SGD(fc.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    curve: list[dict[str, float]] = []
    start_epoch = args.start_epoch
    if args.resume:
        state = _load_state(args.resume, inputs.who, len(inputs.train.classes), backbone.out_dim)
        fc.load_state_dict(state["fc"])
        optimizer.load_state_dict(state["optimizer"])
        curve, start_epoch = list(state["curve"]), int(state["epoch"])
    if start_epoch >= args.epochs and not curve and not args.evaluate:
        raise ConfigError(f"--start-epoch {start_epoch} leaves no epoch of --epochs {args.epochs} to run; "
                          f"lower --start-epoch")
    val_f = extract_features(backbone, val, inputs.device, batch_size=args.batch_size,
                             image_size=inputs.image_size, precision=args.precision, workers=workers,
                             progress=progress, desc=f"val features ({inputs.who})")
    return _Head(inputs, args, backbone, buffers_before, fc, optimizer,
                 inputs.source.out_dir / f"lincls_{inputs.who}.pt", curve, start_epoch, val_f,
                 torch.as_tensor(inputs.val.targets, device=inputs.device))


def _train_step(head: _Head, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """One SGD step of the head's classifier on the frozen features of `images`; the loss."""
    with frozen(head.backbone), autocast(device, head.args.precision):
        feats = head.backbone(images)
    loss = F.cross_entropy(head.fc(feats.float()), labels)
    head.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    head.optimizer.step()
    return float(loss.detach())


def _check_frozen(head: _Head) -> None:
    for name, value in head.backbone.state_dict().items():
        if not torch.equal(value, head.buffers_before[name]):
            raise RuntimeError(f"backbone tensor {name} changed during linear evaluation; the frozen "
                               f"protocol is broken (a bug in cclnb, please report it)")


def _result(head: _Head, started: float, workers: int) -> dict[str, Any]:
    """The lincls_<who>.json of one head."""
    inputs, curve, args = head.inputs, head.curve, head.args
    size, small = inputs.image_size, inputs.image_size <= SMALL_MAX
    best = max(curve, key=lambda row: row["val_top1"])
    own = {k: v for k, v in vars(args).items() if k not in ("func", "also")}
    return {
        "who": inputs.who, "top1": curve[-1]["val_top1"], "top5": curve[-1]["val_top5"],
        "result_note": "final epoch", "best_top1": best["val_top1"], "best_epoch": best["epoch"],
        "best_note": BEST_NOTE, "epochs": args.epochs, "curve": curve,
        "protocol": (f"native {size}px: RandomResizedCrop({size}, 0.08-1)+flip / full image"
                     if small else f"authors {size}px: RandomResizedCrop+flip / resize+center crop"),
        "n_classes": len(inputs.train.classes), "n_train": int(len(inputs.ids)), "n_val": int(len(inputs.val)),
        "image_size": size, "pretrained": str(inputs.source.checkpoint) if inputs.source.checkpoint else None,
        "config": {**own, **inputs.settings, "image_size": size, "device": str(inputs.device),
                   "workers_used": workers},
        "time_s": time.time() - started,
        # the training loop's wall time per epoch run by this command (shared by the encoders of a pass)
        "epoch_s": head.epoch_s,
    }


def _uint8(ds, progress: bool) -> torch.Tensor:
    from cclnb.data import load_uint8

    return torch.from_numpy(load_uint8(ds, progress=progress))


def probe_eval(args: argparse.Namespace) -> dict[str, Any]:
    """The fast alternative to `linear_eval` for small images: frozen features of un-augmented
    images, extracted once, then one convex L-BFGS fit (`feature_probe`; `args.epochs` =
    iterations). Writes `lincls_<who>.json` like `linear_eval`, with its `protocol` saying which
    it was, so reports read both the same way. Not the paper's protocol (no augmentation, another
    optimizer): the demo uses it because it takes seconds on a CPU."""
    from cclnb.data import load_uint8
    from cclnb.evaluate.encoder import overall_accuracy
    from cclnb.evaluate.probe import feature_probe
    from cclnb.training.runs import write_json

    started = time.time()
    inputs = _eval_inputs(args)
    who, source, size, ids = inputs.who, inputs.source, inputs.image_size, inputs.ids
    train_ds, val_ds, device = inputs.train, inputs.val, inputs.device
    check_probe_size(size)
    backbone = load_backbone(source, inputs.settings, True, who, device)
    progress = not args.no_progress
    train_f, val_f = (extract_features(backbone, images, device, image_size=size,
                                       precision=args.precision, progress=progress)
                      for images in (load_uint8(train_ds, ids=ids), load_uint8(val_ds)))
    pred = feature_probe(train_f, torch.as_tensor(train_ds.targets[ids]), val_f,
                         len(train_ds.classes), epochs=args.epochs)
    result = {"who": who, "top1": overall_accuracy(pred, val_ds.targets), "top5": None,
              "epochs": args.epochs, "curve": [], "precision": args.precision,
              "protocol": "probe: L-BFGS logistic regression on frozen features",
              "n_train": int(len(ids)), "n_val": len(val_ds), "image_size": size,
              "pretrained": str(source.checkpoint), "time_s": time.time() - started}
    write_json(source.out_dir / f"lincls_{who}.json", result)
    return result
