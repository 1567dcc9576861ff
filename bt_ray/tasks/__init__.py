"""Built-in tasks: data splits, the paper's DSPy program, and the metric.

A task is three plain callables, so a user's own task has the same shape:
    build_program() -> dspy.Module
    load_splits(config: TaskConfig, seed: int) -> Splits
    metric(example, prediction, trace=None) -> float | bool
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

TASKS: dict[str, "str | Task"] = {"iris": "bt_ray.tasks.iris"}  # name -> module path or a registered Task


@dataclass(frozen=True)
class Splits:
    train: list  # dspy.Example, inputs set
    dev: list
    test: list
    source: str = ""  # where the data came from, said plainly in results

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


@dataclass(frozen=True)
class Task:
    name: str
    build_program: Callable[[], Any]
    load_splits: Callable[[Any, int], Splits]
    metric: Callable[..., Any]


def register(task: Task) -> Task:
    """Make a user's task available as `task.name=<its name>` in configs and overrides."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    entry = TASKS[name]
    return entry if isinstance(entry, Task) else importlib.import_module(entry).TASK
