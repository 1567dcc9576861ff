"""The paper's split drawing: sizes, determinism per seed, no overlap, a fixed test set."""

import pytest

from bt_ray.config import TaskConfig
from bt_ray.tasks import gsm8k, hotpotqa
from bt_ray.tasks.splits import draw

TRAIN_POOL = [f"train-{i}" for i in range(100)]
TEST_POOL = [f"test-{i}" for i in range(40)]


def test_sizes_and_no_overlap():
    train, dev, test = draw(TRAIN_POOL, TEST_POOL, (30, 20, 10), seed=0, what="x")
    assert (len(train), len(dev), len(test)) == (30, 20, 10)
    assert not set(train) & set(dev)
    assert set(train) | set(dev) <= set(TRAIN_POOL) and set(test) <= set(TEST_POOL)


def test_same_seed_same_splits_other_seed_other_train_same_test():
    a, b, c = draw(TRAIN_POOL, TEST_POOL, (30, 20, 10), seed=3, what="x"), \
        draw(TRAIN_POOL, TEST_POOL, (30, 20, 10), seed=3, what="x"), \
        draw(TRAIN_POOL, TEST_POOL, (30, 20, 10), seed=4, what="x")
    assert a == b
    assert a[0] != c[0]
    assert a[2] == c[2]  # the held-out test set does not depend on the run's seed


def test_whole_test_set_when_size_is_none():
    assert draw(TRAIN_POOL, TEST_POOL, (1, 1, None), seed=0, what="x")[2] == TEST_POOL


def test_too_large_names_the_keys():
    with pytest.raises(ValueError, match="task.train_size \\+ task.dev_size = 101"):
        draw(TRAIN_POOL, TEST_POOL, (100, 1, 1), seed=0, what="x")
    with pytest.raises(ValueError, match="task.test_size = 41"):
        draw(TRAIN_POOL, TEST_POOL, (1, 1, 41), seed=0, what="x")


def _questions(split):
    return [ex.question for ex in split]


@pytest.mark.parametrize("task,config", [
    (gsm8k, TaskConfig(name="gsm8k", source="offline", train_size=60, dev_size=30, test_size=40)),
    (hotpotqa, TaskConfig(name="hotpotqa", source="offline")),
])
def test_offline_task_splits(task, config):
    splits = task.load_splits(config, seed=0)
    assert splits.offline and "not " in splits.source  # says plainly it is a stand-in
    train, dev, test = map(_questions, (splits.train, splits.dev, splits.test))
    if task is gsm8k:
        assert (len(train), len(dev), len(test)) == (60, 30, 40)
    else:
        assert (len(train), len(dev), len(test)) == hotpotqa.OFFLINE_SIZES
    assert not set(train) & set(dev) and not set(train) & set(test) and not set(dev) & set(test)
    again, other = task.load_splits(config, seed=0), task.load_splits(config, seed=1)
    assert _questions(again.train) == train and _questions(again.test) == test
    assert _questions(other.train) != train and _questions(other.test) == test
    assert all(ex.inputs().keys() == ["question"] for ex in splits.train)
