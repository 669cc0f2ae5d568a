"""Loss terms against values worked out by hand (math.exp/log), not by the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from cclnb.training.losses import distillation_kl, extra_queue_loss, info_nce_queue, min_variance_spread


def _ce_target0(logits: list[float]) -> float:
    return -logits[0] + math.log(sum(math.exp(v) for v in logits))


def _kl(teacher_logits: list[float], student_logits: list[float]) -> float:
    """KL(softmax(teacher) || softmax(student)) for one row, by hand."""
    zt = sum(math.exp(v) for v in teacher_logits)
    zs = sum(math.exp(v) for v in student_logits)
    p = [math.exp(v) / zt for v in teacher_logits]
    return sum(pi * (math.log(pi) - (s - math.log(zs))) for pi, s in zip(p, student_logits))


def test_info_nce_queue_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[0.0, -1.0], [1.0, 0.0]])      # columns: keys (0, 1) and (-1, 0)
    t = 0.5
    expected = (_ce_target0([0.6 / t, 0.0 / t, -1.0 / t]) + _ce_target0([1.0 / t, 1.0 / t, 0.0 / t])) / 2
    assert info_nce_queue(q, k, queue, t).item() == pytest.approx(expected, rel=1e-6)


def test_extra_queue_loss_by_hand() -> None:
    q = torch.tensor([[0.8, 0.6]])
    k = torch.tensor([[1.0, 0.0]])
    extra = torch.tensor([[0.0], [1.0]])                 # a single extra key (0, 1)
    t = 0.2
    assert extra_queue_loss(q, k, extra, t).item() == pytest.approx(_ce_target0([0.8 / t, 0.6 / t]), rel=1e-6)


def test_info_nce_runs_in_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    k = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(16, 64), dim=0)
    exact = info_nce_queue(q, k, queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = info_nce_queue(q, k, queue, 0.07)
    assert under.dtype == torch.float32
    assert under.item() == pytest.approx(exact.item(), rel=1e-6)


# Two old samples in 2-D: S = s_q s_a^T, T = t_q t_a^T.
S_Q = [[1.0, 0.0], [0.0, 1.0]]
S_A = [[0.6, 0.8], [0.0, 1.0]]
T_Q = [[1.0, 0.0], [0.6, 0.8]]
T_A = [[1.0, 0.0], [0.0, 1.0]]


def _pair_kl_by_hand(ts: float = 0.07, tt: float = 0.04) -> float:
    s = [[0.6, 0.0], [0.8, 1.0]]                         # s_q @ s_a^T
    t = [[1.0, 0.0], [0.6, 0.8]]                         # t_q @ t_a^T
    return sum(_kl([v / tt for v in t[i]], [v / ts for v in s[i]]) for i in range(2)) / 2


def _batch(old: list[int], filler: float = 0.3) -> tuple[torch.Tensor, ...]:
    """A batch where the old rows take the pairs above in order and the other rows are filler."""
    rows = {name: [] for name in ("sq", "sa", "tq", "ta")}
    j = 0
    for o in old:
        for name, src in zip(rows, (S_Q, S_A, T_Q, T_A)):
            rows[name].append(src[j] if o else [filler, 1.0])
        j += o
    return (*(torch.tensor(v) for v in rows.values()), torch.tensor(old, dtype=torch.bool))


def test_distillation_kl_by_hand_with_temperatures() -> None:
    sq, sa, tq, ta, old = _batch([1, 1])
    assert distillation_kl(sq, sa, tq, ta, old, 0.07, 0.04).item() == pytest.approx(_pair_kl_by_hand(), rel=1e-5)


def test_distillation_kl_ignores_new_samples() -> None:
    a = distillation_kl(*_batch([1, 0, 1, 0], filler=0.3))
    b = distillation_kl(*_batch([1, 0, 1, 0], filler=-2.0))
    assert a.item() == pytest.approx(_pair_kl_by_hand(), rel=1e-5)
    assert b.item() == pytest.approx(a.item(), rel=1e-6)


def test_distillation_kl_group_is_mean_over_slices() -> None:
    # slice 0 holds both old samples, slice 1 none: it contributes 0 and still counts in the mean.
    sq, sa, tq, ta, old = _batch([1, 1, 0, 0])
    assert distillation_kl(sq, sa, tq, ta, old, group=2).item() == pytest.approx(_pair_kl_by_hand() / 2, rel=1e-5)
    # one old sample per slice: each slice's 1x1 distributions agree, so the loss vanishes, while the
    # whole batch (group 0) compares the two.
    sq, sa, tq, ta, old = _batch([1, 0, 1, 0])
    assert distillation_kl(sq, sa, tq, ta, old, group=2).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_kl(sq, sa, tq, ta, old, group=0).item() == pytest.approx(_pair_kl_by_hand(), rel=1e-5)
    # a ragged last slice (batch 5, slices of 2) counts as a slice of its own: 3 slices
    sq, sa, tq, ta, old = _batch([0, 0, 0, 1, 1])
    assert distillation_kl(sq, sa, tq, ta, old, group=2).item() == pytest.approx(0.0, abs=1e-7)
    sq, sa, tq, ta, old = _batch([1, 1, 0, 0, 0])
    assert distillation_kl(sq, sa, tq, ta, old, group=2).item() == pytest.approx(_pair_kl_by_hand() / 3, rel=1e-5)


def test_distillation_kl_without_old_samples_is_zero_with_grad() -> None:
    sq, sa, tq, ta, _ = _batch([0, 0, 0])
    sq.requires_grad_(True)
    loss = distillation_kl(sq, sa, tq, ta, torch.zeros(3, dtype=torch.bool), group=2)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(sq.grad) == 0


def test_distillation_kl_gradient_reaches_only_old_student_rows() -> None:
    sq, sa, tq, ta, old = _batch([1, 0, 1, 0])
    sq.requires_grad_(True)
    tq.requires_grad_(True)
    distillation_kl(sq, sa, tq, ta, old).backward()
    assert sq.grad[old].abs().sum() > 0
    assert torch.count_nonzero(sq.grad[~old]) == 0
    assert tq.grad is None                               # the teacher is a constant target


def test_min_variance_spread_by_hand() -> None:
    views = torch.tensor([[[1.0, 0.0], [0.6, 0.8]],
                          [[0.0, 1.0], [0.6, 0.8]]])     # (V=2, N=2, D=2)
    spread = min_variance_spread(views)
    r = 1 / math.sqrt(2)                                 # mean (0.5, 0.5) normalized
    by_hand = ((1 - r) ** 2 + r ** 2) * 2
    assert spread.shape == (2,)
    assert spread[0].item() == pytest.approx(by_hand, rel=1e-6)
    assert spread[1].item() == pytest.approx(0.0, abs=1e-7)
