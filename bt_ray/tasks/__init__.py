"""Built-in tasks: data splits, the paper's DSPy program, and the metric.

A task is three plain callables, so a user's own task has the same shape:
    build_program() or build_program(config: TaskConfig) -> dspy.Module
    load_splits(config: TaskConfig, seed: int) -> Splits
    metric(example, prediction, trace=None) -> float | bool
A user's task is named in the config by import path (task.program / task.data /
task.metric = "pkg.module:function") or registered in Python with `register`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

# name -> module path (its TASK) or a registered Task
TASKS: dict[str, "str | Task"] = {"iris": "bt_ray.tasks.iris", "gsm8k": "bt_ray.tasks.gsm8k",
                                  "hotpotqa": "bt_ray.tasks.hotpotqa"}


@dataclass(frozen=True)
class Splits:
    train: list  # dspy.Example, inputs set
    dev: list
    test: list
    source: str = ""  # where the data came from, said plainly in results
    offline: bool = False  # a stand-in shipped for tests and laptops, not the paper's data

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}

    def fingerprint(self) -> dict[str, Any]:
        """Where the data came from and a digest of every example: a resume on other data is refused."""
        digest = hashlib.sha256()
        for part in (self.train, self.dev, self.test):
            for example in part:
                fields = example.toDict() if hasattr(example, "toDict") else example
                digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
            digest.update(b"|")
        return {"source": self.source, "offline": self.offline, **self.sizes(), "digest": digest.hexdigest()[:16]}


@dataclass(frozen=True)
class Task:
    name: str
    build_program: Callable[..., Any]
    load_splits: Callable[[Any, int], Splits]
    metric: Callable[..., Any]

    def program(self, config: Any) -> Any:
        """A fresh program; `build_program` gets the task config if it takes an argument (e.g. a retriever)."""
        takes_config = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                           for p in inspect.signature(self.build_program).parameters.values())
        return self.build_program(config) if takes_config else self.build_program()


def register(task: Task) -> Task:
    """Make a user's task available as `task.name=<its name>` in configs and overrides."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    entry = TASKS[name]
    return entry if isinstance(entry, Task) else importlib.import_module(entry).TASK


def task_for(config: Any) -> Task:
    """The task a TaskConfig names: by import paths (program, data, metric) or a registered name."""
    if config.program:
        return Task(config.name, build_program=load_callable(config.program),
                    load_splits=load_callable(config.data), metric=load_callable(config.metric))
    return get_task(config.name)


def load_callable(path: str) -> Callable:
    """'pkg.module:attr' -> the callable. The current directory is importable, as for `python -m`."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path; write it as pkg.module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} ({exc}); run from the directory that holds it or add "
                         f"it to PYTHONPATH") from None
    target = getattr(module, attr, None)
    if target is None:
        raise ValueError(f"module {module_name!r} has no {attr!r}")
    if not callable(target):
        raise ValueError(f"{path!r} is a {type(target).__name__}, not a function or class")
    return target
