"""Fast evaluation: features, kNN, feature probe, per-task scores, evaluate_encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cclnb.errors import ConfigError, DataError
from cclnb.evaluate import (evaluate_encoder, extract_features, feature_probe, knn_predict, overall_accuracy,
                            per_task_accuracy)


def _clusters(n_per_class: int, n_classes: int, dim: int, seed: int, spread: float = 0.3):
    """Gaussian blobs around random well-separated centres: linearly separable in practice."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=gen)
    return x, y


def _noise(n: int, n_classes: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randint(0, n_classes, (n,), generator=gen)


def test_separable_features_probe_and_knn_near_100() -> None:
    train_f, train_y = _clusters(50, 10, 32, seed=1)
    test_f, test_y = _clusters(20, 10, 32, seed=2)
    assert overall_accuracy(feature_probe(train_f, train_y, test_f, 10), test_y) >= 99.0
    assert overall_accuracy(knn_predict(train_f, train_y, test_f, 10, k=20), test_y) >= 99.0


def test_random_features_give_chance() -> None:
    # 10 classes, 2000 test samples: chance is 10% +- 0.7% (one std), so [6, 14] is ~6 std wide.
    train_f, train_y = _noise(2000, 10, 64, seed=3)
    test_f, test_y = _noise(2000, 10, 64, seed=4)
    probe = overall_accuracy(feature_probe(train_f, train_y, test_f, 10, epochs=30), test_y)
    knn = overall_accuracy(knn_predict(train_f, train_y, test_f, 10), test_y)
    assert 6.0 <= probe <= 14.0
    assert 6.0 <= knn <= 14.0


def test_probe_is_deterministic() -> None:
    train_f, train_y = _noise(300, 5, 16, seed=5)
    a = feature_probe(train_f, train_y, train_f, 5, epochs=20)
    b = feature_probe(train_f, train_y, train_f, 5, epochs=20)
    assert torch.equal(a, b)


def test_knn_votes_weighted_by_similarity() -> None:
    # One close neighbour of class 1 outweighs two far neighbours of class 0 at t = 0.1.
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    test_f = torch.tensor([[1.0, 0.2]])
    assert knn_predict(train_f, train_y, test_f, 2, k=3, t=0.1).tolist() == [1]
    # With a huge temperature the weights flatten and the majority (class 0) wins.
    assert knn_predict(train_f, train_y, test_f, 2, k=3, t=100.0).tolist() == [0]


def test_knn_chunks_agree_with_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    train_f, train_y = _noise(500, 7, 8, seed=6)
    test_f, _ = _noise(300, 7, 8, seed=7)
    whole = knn_predict(train_f, train_y, test_f, 7, k=15)
    monkeypatch.setattr("cclnb.evaluate.knn._SIM_BUDGET", 500 * 7)   # 7 test rows per chunk
    assert torch.equal(knn_predict(train_f, train_y, test_f, 7, k=15), whole)


def test_bad_feature_inputs_raise() -> None:
    f, y = _noise(10, 3, 4, seed=8)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 3\)"):
        knn_predict(f, y + 5, f, 3)
    with pytest.raises(DataError, match="same D"):
        feature_probe(f, y, f[:, :2], 3)
    with pytest.raises(ConfigError, match="k >= 1"):
        knn_predict(f, y, f, 3, k=0)


def test_per_task_accuracy_by_hand() -> None:
    test_y = torch.tensor([0, 0, 1, 2, 3, 3])
    pred = torch.tensor([0, 1, 1, 0, 3, 2])
    # task 0 = classes {0, 1}: 2 of 3 right; task 1 = {2, 3}: 1 of 3 right.
    assert per_task_accuracy(pred, test_y, [[0, 1], [2, 3]]) == pytest.approx([200 / 3, 100 / 3])
    assert overall_accuracy(pred, test_y) == pytest.approx(50.0)
    with pytest.raises(DataError, match="task 1 .* no val image"):
        per_task_accuracy(pred, test_y, [[0], [7]])


class _TinyNet(nn.Module):
    """A BatchNorm network small enough for CPU tests; BN makes eval/train mode matter."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _images(n: int, seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_extract_features_frozen_and_batch_invariant() -> None:
    net = _TinyNet().train()
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    images = _images(37, seed=9)
    a = extract_features(net, images, "cpu", batch_size=8, progress=False)
    b = extract_features(net, torch.from_numpy(images), "cpu", batch_size=37, progress=False)
    assert a.shape == (37, 8) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)          # eval mode: a sample's feature ignores its batch
    assert net.training                        # the caller's mode is restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, buffers[k]), k   # running statistics untouched


def test_extract_features_dataset_path_matches_array_path() -> None:
    from cclnb.data.base import ArrayDataset

    images = _images(12, seed=10)
    ds = ArrayDataset(name="t", kind="demo", split="val", classes=["a"], images=images,
                      targets=np.zeros(12, dtype=np.int64), identity="t")
    net = _TinyNet()
    torch.testing.assert_close(extract_features(net, ds, "cpu", batch_size=5, progress=False),
                               extract_features(net, images, "cpu", batch_size=5, progress=False),
                               atol=1e-5, rtol=1e-5)


def test_extract_features_rejects_float_images() -> None:
    with pytest.raises(DataError, match="uint8"):
        extract_features(_TinyNet(), np.zeros((2, 8, 8, 3), dtype=np.float32), "cpu", progress=False)


def test_evaluate_encoder_result_shape_and_range() -> None:
    net = _TinyNet()
    train_y = np.repeat(np.arange(4), 10)
    val_y = np.repeat(np.arange(4), 5)
    out = evaluate_encoder(net, _images(40, seed=11), train_y, _images(20, seed=12), val_y,
                           [np.array([2, 0]), np.array([1, 3])], "both", "cpu", knn_k=5,
                           probe_epochs=5, progress=False)
    assert set(out) == {"knn", "probe"}
    for result in out.values():
        assert len(result["per_task"]) == 2
        assert all(0.0 <= a <= 100.0 for a in result["per_task"] + [result["all"]])
    only_knn = evaluate_encoder(net, _images(40, seed=11), train_y, _images(20, seed=12), val_y,
                                [[2, 0], [1, 3]], "knn", "cpu", knn_k=5, progress=False)
    assert set(only_knn) == {"knn"} and only_knn["knn"] == out["knn"]
    with pytest.raises(ConfigError, match="knn, probe or both"):
        evaluate_encoder(net, _images(4, 0), [0] * 4, _images(4, 1), [0] * 4, [[0]], "none", "cpu")


def test_calibrate_batchnorm_takes_the_exact_statistics_of_the_images_and_keeps_the_weights() -> None:
    """The `untrained-bn` baseline: running statistics = the average over the images' eval views
    (two equal batches here, so the average of batch means is the mean), weights untouched, the
    module's mode and BatchNorm momentum as before."""
    from cclnb.data.augment import anchor_uint8
    from cclnb.evaluate import calibrate_batchnorm
    from cclnb.training.models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", stem="imagenet").eval()
    weights = {k: v.clone() for k, v in backbone.state_dict().items() if "running" not in k and "batches" not in k}
    images = torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(backbone.bn1.running_var, torch.ones(64))
    calibrate_batchnorm(backbone, images, "cpu", batch_size=10, progress=False)
    with torch.no_grad():
        first = backbone.conv1(anchor_uint8(images, 32, small_images=True))
    torch.testing.assert_close(backbone.bn1.running_mean, first.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(backbone.bn1.running_var, torch.ones(64))
    assert not backbone.training and backbone.bn1.momentum == 0.1
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in weights.items())
