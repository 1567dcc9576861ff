"""The paper's way of drawing splits (Soylu et al. 2024, section 4 and appendix C).

Train and dev (1000 / 500 unless configured) come from the official *train* file,
shuffled by the run's seed, disjoint. Test is the official held-out set (GSM8K's
1319-problem test set; 1500 HotPotQA questions of the official dev set), drawn
with a fixed seed so every run seed is scored on the same test examples.
"""

from __future__ import annotations

import random
from typing import Sequence

TEST_SEED = 0  # the held-out test draw does not depend on the run's seed


def draw(train_pool: Sequence, test_pool: Sequence, sizes: tuple[int, int, int | None], seed: int,
         what: str) -> tuple[list, list, list]:
    """(train, dev, test): train + dev from `train_pool` by `seed`, test from `test_pool` (None = all of it)."""
    n_train, n_dev, n_test = sizes
    if n_train + n_dev > len(train_pool):
        raise ValueError(f"task.train_size + task.dev_size = {n_train + n_dev} but {what} has "
                         f"{len(train_pool)} training examples; lower them")
    if n_test is not None and n_test > len(test_pool):
        raise ValueError(f"task.test_size = {n_test} but {what} has {len(test_pool)} test examples; lower it")
    order = list(train_pool)
    random.Random(seed).shuffle(order)
    held_out = list(test_pool)
    if n_test is not None and n_test < len(held_out):
        random.Random(TEST_SEED).shuffle(held_out)
        held_out = held_out[:n_test]
    return order[:n_train], order[n_train:n_train + n_dev], held_out


def sizes_of(config, default: tuple[int, int, int | None]) -> tuple[int, int, int | None]:
    """The configured split sizes, each falling back to the task's paper size."""
    return (config.train_size or default[0], config.dev_size or default[1],
            config.test_size if config.test_size is not None else default[2])
