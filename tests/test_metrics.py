"""Metrics on accuracy matrices worked out by hand (numbers in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from cclnb.errors import ConfigError
from cclnb.evaluate.metrics import (average_accuracy, average_forgetting, backward_transfer,
                                    forgetting_per_task)

# R[i][j] = accuracy on task j after task i. Upper entries are real (all-class probe) but unused.
R3 = [[80.0, 10.0, 12.0],
      [70.0, 90.0, 15.0],
      [60.0, 85.0, 70.0]]


def test_average_accuracy_by_hand() -> None:
    # row 0: 80; row 1: (70 + 90) / 2 = 80; row 2: (60 + 85 + 70) / 3 = 71.666...
    assert average_accuracy(R3) == pytest.approx([80.0, 80.0, 215.0 / 3])


def test_forgetting_by_hand() -> None:
    # task 0: max(80, 70) - 60 = 20; task 1: max(90) - 85 = 5; mean 12.5
    assert forgetting_per_task(R3) == pytest.approx([20.0, 5.0])
    assert average_forgetting(R3) == pytest.approx(12.5)


def test_backward_transfer_by_hand() -> None:
    # (60 - 80 + 85 - 90) / 2 = -12.5
    assert backward_transfer(R3) == pytest.approx(-12.5)


def test_forgetting_uses_best_earlier_row_not_diagonal() -> None:
    # task 0 improves after task 1 (50 -> 75) then drops to 55: forgetting 75 - 55 = 20, while
    # Avalanche's forgetting (= -BWT) only sees 50 - 55 = -5 for it.
    R = [[50.0, 0.0, 0.0], [75.0, 60.0, 0.0], [55.0, 60.0, 40.0]]
    assert forgetting_per_task(R) == pytest.approx([20.0, 0.0])
    assert backward_transfer(R) == pytest.approx(((55 - 50) + (60 - 60)) / 2)
    assert average_forgetting(R) >= -backward_transfer(R)


def test_since_learned_false_counts_rows_before_learning() -> None:
    # task 1 scored 95 before it was trained (row 0), 90 after, 85 at the end.
    R = [[80.0, 95.0, 0.0], [70.0, 90.0, 0.0], [60.0, 85.0, 70.0]]
    assert forgetting_per_task(R) == pytest.approx([20.0, 5.0])
    assert forgetting_per_task(R, since_learned=False) == pytest.approx([20.0, 10.0])


def test_constant_rows_give_zero_forgetting_and_transfer() -> None:
    R = np.array([[50.0, 1.0, 2.0, 3.0]] * 4)
    assert average_forgetting(R) == 0.0
    assert backward_transfer(R) == 0.0


@pytest.mark.parametrize("bad, fragment", [
    ([[1.0, 2.0]], "square"),
    ([[1.0]], "at least 2 tasks"),
    ([[1.0, float("nan")], [1.0, 2.0]], "NaN"),
])
def test_bad_matrices_raise_config_error(bad: list, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        average_forgetting(bad)


def test_single_task_average_accuracy() -> None:
    assert average_accuracy([[42.0]]) == [42.0]
