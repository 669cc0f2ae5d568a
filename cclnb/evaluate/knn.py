"""Weighted k-nearest-neighbour classifier on frozen features (InstDisc / MoCo monitor).

Each test feature votes with its k most cosine-similar training features; a neighbour's vote for
its class weighs exp(similarity / t), so close neighbours dominate. No training, no
hyper-parameter search: this is why it is cheap enough to run after every task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cclnb.errors import ConfigError, DataError

# Similarity entries held at once (rows x train size), ~256 MiB of float32.
_SIM_BUDGET = 1 << 26


def check_features(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
                   n_classes: int) -> None:
    """Shared argument checks of the feature classifiers: shapes agree, labels in range."""
    if train_f.ndim != 2 or test_f.ndim != 2 or train_f.shape[1] != test_f.shape[1]:
        raise DataError(f"features must be (N, D) and (M, D) with the same D; got "
                        f"{tuple(train_f.shape)} and {tuple(test_f.shape)}")
    if train_y.ndim != 1 or train_y.shape[0] != train_f.shape[0]:
        raise DataError(f"need one label per training feature: {train_f.shape[0]} features, "
                        f"labels of shape {tuple(train_y.shape)}")
    if train_f.shape[0] == 0:
        raise DataError("no training features: the training split is empty")
    if n_classes < 1 or int(train_y.min()) < 0 or int(train_y.max()) >= n_classes:
        raise DataError(f"labels must lie in [0, {n_classes}); got [{int(train_y.min())}, "
                        f"{int(train_y.max())}]; pass n_classes = the dataset's class count")


def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, n_classes: int,
                k: int = 200, t: float = 0.1) -> torch.Tensor:
    """Predicted class (int64, shape (M,)) of every test feature, on the features' device.

    Features are L2-normalized here (cosine similarity); `k` is capped at the training size.
    Test rows are processed in chunks so the similarity matrix never exceeds ~256 MiB.
    """
    train_y = torch.as_tensor(train_y, device=train_f.device).long()
    check_features(train_f, train_y, test_f, n_classes)
    if k < 1 or t <= 0:
        raise ConfigError(f"kNN needs k >= 1 and t > 0, got k={k}, t={t}")
    k = min(k, train_f.shape[0])
    train_n = F.normalize(train_f.float(), dim=1)
    test_n = F.normalize(test_f.float().to(train_f.device), dim=1)
    rows = max(1, _SIM_BUDGET // train_n.shape[0])
    preds = []
    for start in range(0, test_n.shape[0], rows):
        sim = test_n[start:start + rows] @ train_n.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], n_classes, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=train_f.device)
