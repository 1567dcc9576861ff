"""Bad input from the user's side (program, metric, data) over the fake engine (labelled; no Ray, no model).

Config errors (unknown keys, bad strategies, malformed YAML, missing model, cluster too small, subsample
too large, incompatible --resume) are in test_config.py, test_preflight.py and test_driver.py.
"""

import json
import logging

import pytest

from bt_ray.config import load_config
from bt_ray.driver import Driver
from bt_ray.errors import MetricError
from bt_ray.tasks import Task, get_task, register

from .fakes import FakeSession
from .test_driver import fake_trainer  # noqa: F401  (fixture)
from .test_prompt_phase import noisy_classifier

IRIS = get_task("iris")


def iris_with(name, *, metric=None, program=None) -> Task:
    return register(Task(name, program or IRIS.build_program, IRIS.load_splits, metric or IRIS.metric))


def run(tmp_path, task: Task, strategy: str, responder=noisy_classifier):
    config = load_config("configs/iris.yaml", [f"output_dir={tmp_path}", "name=t", f"task.name={task.name}",
                                               f"strategy={strategy}"])
    return Driver(config).run(session=FakeSession(responder))


def test_a_metric_that_raises_on_some_examples_counts_them_as_errors(tmp_path, fake_trainer):  # noqa: F811
    def picky(example, prediction, trace=None):
        if float(example.petal_length) > 6:
            raise ValueError("cannot judge long petals")
        return IRIS.metric(example, prediction, trace)

    results = run(tmp_path, iris_with("iris-picky-metric", metric=picky), "p")
    dev = results["steps"][1]
    assert 0 < dev["dev_errors"] < dev["dev_n"], dev
    assert "| errors |" in (tmp_path / "t" / "results.md").read_text()


def test_a_metric_that_always_raises_stops_the_run_and_keeps_what_finished(tmp_path, fake_trainer, caplog):  # noqa: F811
    def broken(example, prediction, trace=None):
        return prediction.species == example.answer  # no such field

    task = iris_with("iris-broken-metric", metric=broken)
    with caplog.at_level(logging.WARNING), pytest.raises(MetricError, match="raised on all .* predictions"):
        run(tmp_path, task, "p")
    assert "metric raised on a gold answer" in caplog.text  # warned before any model call
    # It failed scoring the baseline, before any phase: no step was recorded as finished.
    state = tmp_path / "t" / "state.json"
    assert not state.exists() or json.loads(state.read_text())["steps"] == []


def test_a_program_that_raises_on_some_examples_is_counted_not_a_crash(tmp_path, fake_trainer):  # noqa: F811
    import dspy

    class Flaky(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = IRIS.build_program()

        def forward(self, **inputs):
            if float(inputs["sepal_width"]) > 3.5:
                raise RuntimeError("tool timeout")
            return self.inner(**inputs)

    results = run(tmp_path, iris_with("iris-flaky-program", program=Flaky), "p -> w")
    assert [s["strategy"] for s in results["steps"]] == ["vanilla", "Π", "Π→Θ"]
    assert all(0 < s["dev_errors"] < s["dev_n"] for s in results["steps"]), results["steps"]
    assert results["test"]["errors"] > 0
