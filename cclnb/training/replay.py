"""Label-free choice of the images to replay after a task.

Both selections take sample ids and (for CCL) features, never labels: the continual setting is
unsupervised, and a selection that peeked at labels would leak supervision into pretraining.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cclnb.errors import ConfigError
from cclnb.training.losses import min_variance_spread


def select_random(ids: np.ndarray, n: int, rng: np.random.Generator, with_replacement: bool) -> np.ndarray:
    """`n` ids drawn uniformly from `ids` (SimpleReplay).

    `with_replacement=True` is the authors' behaviour (`np.random.randint`, duplicates possible);
    `False` draws `n` distinct ids, which needs `n <= len(ids)`.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if n < 0:
        raise ConfigError(f"cannot keep a negative number of replay images ({n}); use --n-save >= 0")
    if n == 0:
        return ids[:0]
    if len(ids) == 0:
        raise ConfigError(f"cannot draw {n} replay images from a task with no images; "
                          "check the data and --subset-per-class")
    if with_replacement:
        return ids[rng.integers(0, len(ids), size=n)]
    if n > len(ids):
        raise ConfigError(f"cannot keep {n} distinct replay images from a task of {len(ids)} images; "
                          "lower --n-save or draw with replacement")
    return ids[rng.choice(len(ids), size=n, replace=False)]


def _squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(N, K) squared Euclidean distances, one matmul (clamped: rounding can go below 0)."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centers.t() + (centers * centers).sum(1)[None, :]
    return d.clamp_(min=0)


def _kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next center is drawn with probability proportional to its squared
    distance to the nearest chosen center. Draws use a CPU generator so a seed means the same
    centers on every device."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    nearest = _squared_distances(x, x[first][None]).squeeze(1)
    for _ in range(1, k):
        weights = nearest.double().cpu()
        total = float(weights.sum())
        if total > 0:
            pick = int(torch.multinomial(weights / total, 1, generator=generator))
        else:  # all remaining points coincide with a center: any point will do
            pick = int(torch.randint(n, (1,), generator=generator))
        centers.append(x[pick])
        nearest = torch.minimum(nearest, _squared_distances(x, x[pick][None]).squeeze(1))
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0) -> torch.Tensor:
    """Cluster labels (N,) int64 of Lloyd's k-means with k-means++ seeding, on x's device.

    Deterministic for a given seed (on CPU bit-for-bit); stops early when no label changes. An
    empty cluster keeps its previous center. Runs in fp32 with plain matmuls, so 5,000 x 128
    takes milliseconds on a GPU (the authors' scikit-learn call on CPU took over a minute).
    """
    if x.ndim != 2:
        raise ConfigError(f"k-means needs a 2-D (N, D) feature matrix, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"cannot form {k} clusters from {n} images; a task needs at least as many "
                          "images as classes per task (raise --subset-per-class)")
    x = x.detach().float()
    generator = torch.Generator().manual_seed(seed)
    centers = _kmeans_pp_init(x, k, generator)
    labels = _squared_distances(x, centers).argmin(1)
    for _ in range(iters):
        one_hot = F.one_hot(labels, k).to(x.dtype)               # a matmul beats index_add on CPU
        sums, counts = one_hot.t() @ x, one_hot.sum(0)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        new_labels = _squared_distances(x, centers).argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def select_min_variance(view_feats: torch.Tensor, anchor_feats: torch.Tensor, ids: np.ndarray,
                        n_clusters: int, n_save: int, seed: int = 0) -> np.ndarray:
    """CCL's replay choice: per k-means cluster of the anchor features, the `n_save` images whose
    embedding moves least across views (`min_variance_spread`), all of them if the cluster is
    smaller.

    view_feats (V, N, D): the L2-normalized embeddings over which the spread is measured; the
    authors use 6 MoCo v2 views *plus* the anchor view (V = 7), so stack the anchor in yourself.
    anchor_feats (N, D): the anchor view's embeddings, which k-means clusters (n_clusters = classes
    per task in the authors' code). Returns ids ordered by cluster, then by increasing spread.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if view_feats.ndim != 3 or anchor_feats.ndim != 2:
        raise ConfigError(f"view features must be (V, N, D) and anchor features (N, D); got "
                          f"{tuple(view_feats.shape)} and {tuple(anchor_feats.shape)}")
    if not view_feats.shape[1] == anchor_feats.shape[0] == len(ids):
        raise ConfigError(f"{view_feats.shape[1]} view features, {anchor_feats.shape[0]} anchor features "
                          f"and {len(ids)} ids do not describe the same images")
    if n_save < 0:
        raise ConfigError(f"cannot keep a negative number of images per cluster ({n_save}); use --n-save >= 0")
    labels = kmeans(anchor_feats, n_clusters, seed=seed).cpu().numpy()
    spread = min_variance_spread(view_feats).cpu().numpy()
    order = np.lexsort((spread, labels))                        # by cluster, then spread
    sorted_labels = labels[order]
    first_of_cluster = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - first_of_cluster
    return ids[order[rank < n_save]]
