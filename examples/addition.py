"""A user's own task, outside bt_ray: adding two numbers, with a chain-of-thought program.

bt-ray finds it by import path (run from the repository root, which is importable):
    bt-ray run examples/addition.yaml
The three callables are all a task is; nothing here imports bt_ray except `Splits`.
"""

import random
import re

import dspy

from bt_ray.tasks import Splits


class Add(dspy.Module):
    def __init__(self):
        super().__init__()
        self.solve = dspy.ChainOfThought("question -> answer: int")

    def forward(self, question):
        return self.solve(question=question)


def build_program():
    return Add()


def load_splits(task_config, seed):
    """All sums a + b with 1 <= a, b <= 30, shuffled by the run's seed into train / dev / test."""
    rows = [(a, b) for a in range(1, 31) for b in range(1, 31)]
    random.Random(seed).shuffle(rows)
    sizes = [task_config.train_size or 100, task_config.dev_size or 50, task_config.test_size or 50]
    examples = [dspy.Example(question=f"What is {a} + {b}?", answer=str(a + b)).with_inputs("question")
                for a, b in rows[:sum(sizes)]]
    train, dev = examples[:sizes[0]], examples[sizes[0]:sizes[0] + sizes[1]]
    return Splits(train, dev, examples[sizes[0] + sizes[1]:], source="examples/addition.py (generated sums)")


def metric(example, prediction, trace=None):
    found = re.findall(r"-?\d+", str(getattr(prediction, "answer", "")))
    return bool(found) and found[0] == example.answer
