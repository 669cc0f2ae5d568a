"""Label-free replay selection on synthetic features where the right answer is planted."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cclnb.errors import ConfigError
from cclnb.training.replay import kmeans, select_min_variance, select_random


def test_select_random_with_replacement_is_seeded_and_may_repeat() -> None:
    ids = np.arange(100, 110)
    a = select_random(ids, 30, np.random.default_rng(3), with_replacement=True)
    b = select_random(ids, 30, np.random.default_rng(3), with_replacement=True)
    assert a.dtype == np.int64 and len(a) == 30
    assert np.array_equal(a, b)
    assert set(a) <= set(ids) and len(set(a)) < 30       # 30 draws from 10 ids must repeat


def test_select_random_without_replacement() -> None:
    ids = np.arange(50, 70)
    got = select_random(ids, 20, np.random.default_rng(0), with_replacement=False)
    assert sorted(got) == list(ids)
    assert len(select_random(ids, 0, np.random.default_rng(0), with_replacement=False)) == 0
    with pytest.raises(ConfigError, match="n-save"):
        select_random(ids, 21, np.random.default_rng(0), with_replacement=False)
    with pytest.raises(ConfigError, match="no images"):
        select_random(ids[:0], 1, np.random.default_rng(0), with_replacement=True)


def _blobs(n_per: int, centers: torch.Tensor, noise: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = centers.repeat_interleave(n_per, 0) + noise * torch.randn(len(centers) * n_per, centers.shape[1], generator=g)
    return x, np.repeat(np.arange(len(centers)), n_per)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_kmeans_recovers_separated_blobs_deterministically() -> None:
    centers = torch.eye(4, 8) * 10
    x, truth = _blobs(30, centers, noise=0.5, seed=1)
    labels = kmeans(x, 4, seed=7)
    assert labels.dtype == torch.int64 and labels.shape == (120,)
    assert _same_partition(labels.numpy(), truth)
    assert torch.equal(labels, kmeans(x, 4, seed=7))


def test_kmeans_rejects_too_many_clusters() -> None:
    with pytest.raises(ConfigError, match="clusters"):
        kmeans(torch.randn(3, 2), 4)


def _planted(n_clusters: int = 3, n_per: int = 20, n_steady: int = 2, views: int = 7, seed: int = 0):
    """Anchor features in separated clusters; every image's views jitter around its anchor, the
    first `n_steady` of each cluster (steadier in increasing order) far less than the others."""
    centers = F.normalize(torch.eye(n_clusters, 16) * 5 + 0.1, dim=1)
    anchor, _ = _blobs(n_per, centers, noise=0.02, seed=seed)
    anchor = F.normalize(anchor, dim=1)
    g = torch.Generator().manual_seed(seed + 1)
    scale = torch.full((n_clusters, n_per), 0.3)
    scale[:, :n_steady] = torch.linspace(0.001, 0.01, n_steady)
    scale = scale.reshape(-1, 1)
    view_feats = F.normalize(anchor[None] + scale * torch.randn(views, len(anchor), 16, generator=g), dim=2)
    steady = [c * n_per + i for c in range(n_clusters) for i in range(n_steady)]
    return view_feats, anchor, steady


def test_select_min_variance_finds_planted_steady_images() -> None:
    view_feats, anchor, steady = _planted()
    ids = np.arange(len(anchor)) + 1000
    got = select_min_variance(view_feats, anchor, ids, n_clusters=3, n_save=2, seed=0)
    assert sorted(got) == sorted(ids[steady])
    # ordered by cluster, then by increasing spread: each consecutive pair is one cluster, steadiest first
    for pair in got.reshape(3, 2):
        assert pair[0] < pair[1] and (pair[1] - pair[0]) == 1


def test_select_min_variance_keeps_whole_small_clusters() -> None:
    view_feats, anchor, _ = _planted(n_per=4)
    got = select_min_variance(view_feats, anchor, np.arange(12), n_clusters=3, n_save=10, seed=0)
    assert sorted(got) == list(range(12))


def test_select_min_variance_checks_shapes() -> None:
    view_feats, anchor, _ = _planted()
    with pytest.raises(ConfigError, match="same images"):
        select_min_variance(view_feats, anchor, np.arange(10), n_clusters=3, n_save=2)
    with pytest.raises(ConfigError, match=r"\(V, N, D\)"):
        select_min_variance(view_feats[0], anchor, np.arange(len(anchor)), n_clusters=3, n_save=2)


def test_select_min_variance_task_sized_input_is_fast() -> None:
    """A 5,000-image task, 7 views, 128 dims: the authors' selection took over a minute."""
    g = torch.Generator().manual_seed(0)
    view_feats = F.normalize(torch.randn(7, 5000, 128, generator=g), dim=2)
    start = time.perf_counter()
    got = select_min_variance(view_feats, view_feats[-1], np.arange(5000), n_clusters=10, n_save=20, seed=0)
    assert len(got) == 200 and len(set(got)) == 200
    assert time.perf_counter() - start < 20, "min-variance selection of one task should take seconds"
