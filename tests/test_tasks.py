"""Class order and task splits: exactly the authors' order, equal chunks, per-task sample ids."""

from __future__ import annotations

import numpy as np
import pytest

from cclnb.data.tasks import class_order, split_classes, task_sample_ids
from cclnb.errors import ConfigError


def _authors_order(n_classes: int, seed: int) -> np.ndarray:
    """The authors' recipe on NumPy's legacy *global* RNG; the caller's RNG state is restored."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        order = np.arange(n_classes)
        np.random.shuffle(order)
        return order
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("n_classes,seed", [(100, 1), (200, 1), (10, 1), (100, 7)])
def test_class_order_is_the_authors(n_classes, seed) -> None:
    assert np.array_equal(class_order(n_classes, seed), _authors_order(n_classes, seed))


def test_class_order_leaves_the_global_rng_alone() -> None:
    np.random.seed(123)
    expected = np.random.random_sample(3)
    np.random.seed(123)
    class_order(100)
    assert np.array_equal(np.random.random_sample(3), expected)


def test_ten_task_split_of_100_classes_matches_the_authors() -> None:
    order = _authors_order(100, 1)
    tasks = split_classes(class_order(100), 10)
    assert len(tasks) == 10
    for t, classes in enumerate(tasks):
        assert np.array_equal(classes, order[t * 10:(t + 1) * 10])
    assert sorted(np.concatenate(tasks).tolist()) == list(range(100))


def test_split_that_does_not_divide_says_what_would() -> None:
    with pytest.raises(ConfigError, match=r"100 classes cannot be split into 7 equal tasks; choose "
                                          r"--n-tasks from 1, 2, 4, 5, 10, 20, 25, 50, 100"):
        split_classes(class_order(100), 7)
    with pytest.raises(ConfigError, match="into 0 equal tasks"):
        split_classes(class_order(10), 0)


def test_task_sample_ids_partition_the_samples() -> None:
    targets = np.array([3, 0, 1, 2, 3, 1, 0, 2, 2])
    tasks = [np.array([3, 1]), np.array([0, 2])]
    ids = task_sample_ids(targets, tasks)
    assert [i.tolist() for i in ids] == [[0, 2, 4, 5], [1, 3, 6, 7, 8]]
    subset = task_sample_ids(targets, tasks, ids=np.array([8, 5, 0, 1]))
    assert [i.tolist() for i in subset] == [[0, 5], [1, 8]]


def test_task_sample_ids_on_real_labels(sub100_train) -> None:
    tasks = split_classes(class_order(100), 10)
    ids = task_sample_ids(sub100_train.targets, tasks)
    assert [len(i) for i in ids] == [5000] * 10
    for classes, task_ids in zip(tasks, ids):
        assert set(np.unique(sub100_train.targets[task_ids])) == set(classes.tolist())
