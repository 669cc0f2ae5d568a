"""The per-task measurement of a continual run: kNN and/or fast probe, scored per task.

After every task the trainer asks "how good is the encoder now, on each task's classes?". The
classifier (kNN or probe) always spans all classes of the dataset, so a row of the accuracy
matrix is one all-class prediction split by the tasks' class sets, exactly as the final linear
evaluation classifies: no task-incremental shortcut of picking among the task's classes only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from cclnb.errors import ConfigError, DataError
from cclnb.evaluate.features import extract_features
from cclnb.evaluate.knn import knn_predict
from cclnb.evaluate.probe import feature_probe
from cclnb.training.dist import DistContext

PROTOCOLS = {"knn": ("knn",), "probe": ("probe",), "both": ("knn", "probe")}


def _labels(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)).long()


def overall_accuracy(pred, test_y) -> float:
    """Percent of test samples whose prediction equals the label."""
    pred, test_y = _labels(pred), _labels(test_y)
    if pred.shape != test_y.shape or pred.numel() == 0:
        raise DataError(f"need one prediction per test label, got {tuple(pred.shape)} predictions "
                        f"for {tuple(test_y.shape)} labels")
    return float((pred == test_y).double().mean() * 100.0)


def per_task_accuracy(pred, test_y, task_classes: Sequence[Sequence[int]]) -> list[float]:
    """Percent correct among the test samples of each task's classes (one entry per task).

    A task with no test sample has no accuracy: that is a data problem, reported as such.
    """
    pred, test_y = _labels(pred), _labels(test_y)
    if pred.shape != test_y.shape:
        raise DataError(f"need one prediction per test label, got {tuple(pred.shape)} predictions "
                        f"for {tuple(test_y.shape)} labels")
    result = []
    for task, classes in enumerate(task_classes):
        mask = torch.isin(test_y, _labels(classes))
        if not bool(mask.any()):
            raise DataError(f"task {task} (classes {list(map(int, classes))[:5]}...) has no val image; "
                            f"the val split must hold images of every class")
        result.append(float((pred[mask] == test_y[mask]).double().mean() * 100.0))
    return result


def evaluate_encoder(backbone: nn.Module, train_images, train_y, val_images, val_y,
                     task_classes: Sequence[Sequence[int]], which: str, device: str | torch.device,
                     knn_k: int = 200, knn_t: float = 0.1, precision: str = "fp32",
                     n_classes: int | None = None, batch_size: int = 512, image_size: int | None = None,
                     probe_epochs: int = 100, progress: bool = True,
                     ctx: DistContext | None = None) -> dict[str, dict]:
    """Score a frozen encoder on every task's val classes with the requested protocol(s).

    `train_images`/`val_images`: (N, H, W, 3) uint8 arrays or tensors, or ImageDatasets;
    `train_y`/`val_y`: their labels; `task_classes`: the class ids of each task; `which`:
    knn | probe | both. `n_classes` defaults to 1 + the largest label or task class, i.e. all
    classes of the dataset. Features are extracted once and shared by both protocols.

    Returns `{"knn": {"per_task": [...], "all": acc}, "probe": {...}}` with only the requested
    protocols; accuracies in percent; "all" is the accuracy over every val image.

    With a distributed `ctx` (every rank calling with the same arguments) the features are
    extracted in shards and gathered (`extract_features`), and every rank classifies the same
    features, so every rank returns the one-process result.
    """
    if which not in PROTOCOLS:
        raise ConfigError(f"which must be knn, probe or both, got {which!r}")
    device = torch.device(device)
    train_labels, val_labels = _labels(train_y), _labels(val_y)
    if n_classes is None:
        largest = [int(train_labels.max()), int(val_labels.max())]
        largest += [int(np.max(np.asarray(c))) for c in task_classes if len(c)]
        n_classes = 1 + max(largest)
    kwargs = dict(batch_size=batch_size, image_size=image_size, precision=precision, progress=progress, ctx=ctx)
    train_f = extract_features(backbone, train_images, device, desc="eval features (train)", **kwargs)
    val_f = extract_features(backbone, val_images, device, desc="eval features (val)", **kwargs)
    for name, feats, labels in (("train", train_f, train_labels), ("val", val_f, val_labels)):
        if feats.shape[0] != labels.shape[0]:
            raise DataError(f"{name}: {feats.shape[0]} images but {labels.shape[0]} labels; pass the "
                            f"labels of exactly these images")
    results: dict[str, dict] = {}
    for protocol in PROTOCOLS[which]:
        if protocol == "knn":
            pred = knn_predict(train_f, train_labels.to(device), val_f, n_classes, k=knn_k, t=knn_t)
        else:
            pred = feature_probe(train_f, train_labels.to(device), val_f, n_classes, epochs=probe_epochs)
        results[protocol] = {"per_task": per_task_accuracy(pred, val_labels, task_classes),
                             "all": overall_accuracy(pred, val_labels)}
    return results
