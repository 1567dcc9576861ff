"""A user's own task by import path (task.program / task.data / task.metric), checked before any work."""

import pytest

from bt_ray.config import load_config
from bt_ray.driver import Driver
from bt_ray.errors import ConfigError
from bt_ray.tasks import load_callable, task_for

from .fakes import FakeSession
from .test_driver import fake_trainer  # noqa: F401  (fixture)


def test_example_task_resolves_and_loads():
    config = load_config("examples/addition.yaml")
    task = task_for(config.task)
    assert task.name == "addition"
    splits = task.load_splits(config.task, config.seed)
    assert splits.sizes() == {"train": 60, "dev": 30, "test": 30}
    program = task.program(config.task)
    assert [name for name, _ in program.named_predictors()] == ["solve.predict"]
    example = splits.dev[0]
    assert task.metric(example, type("P", (), {"answer": example.answer})())


def test_example_runs_p_w_p_through_the_driver(tmp_path, fake_trainer):  # noqa: F811
    """The whole loop on a fake model and a fake trainer (labelled): the user task is used as given."""
    def solve(request):
        question = request.messages[-1]["content"].split("What is ")[-1].split("?")[0]
        a, b = (int(x) for x in question.split(" + "))
        return f"[[ ## reasoning ## ]]\nadd\n\n[[ ## answer ## ]]\n{a + b}\n\n"

    config = load_config("examples/addition.yaml", [f"output_dir={tmp_path}", "name=u"])
    results = Driver(config).run(session=FakeSession(solve))
    assert [s["strategy"] for s in results["steps"]] == ["vanilla", "Π", "Π→Θ", "Π→Θ→Π"]
    assert results["task"] == "addition" and results["test"]["score"] == 100.0
    assert fake_trainer == ["u-v1"]


@pytest.mark.parametrize("overrides,message", [
    (["task.program=examples.addition:build_program"], "task.data: missing"),
    (["task.program=examples.addition:build_program", "task.data=examples.addition:load_splits",
      "task.metric=examples.no_such_module:metric"], "task.metric: cannot import 'examples.no_such_module'"),
    (["task.program=examples.addition:nothing", "task.data=examples.addition:load_splits",
      "task.metric=examples.addition:metric"], "task.program: module 'examples.addition' has no 'nothing'"),
    (["task.program=examples.addition", "task.data=examples.addition:load_splits",
      "task.metric=examples.addition:metric"], "task.program: 'examples.addition' is not an import path"),
    (["task.name=mine"], "task.name: unknown task 'mine'.*set task.program, task.data and task.metric"),
])
def test_bad_import_paths_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_not_callable():
    with pytest.raises(ValueError, match="is a module, not a function"):
        load_callable("examples.addition:random")


def tuple_splits(task_config, seed):  # a user's data function that forgot Splits (used by the test below)
    from examples.addition import load_splits

    splits = load_splits(task_config, seed)
    return splits.train, splits.dev, splits.test


def no_test_split(task_config, seed):
    from dataclasses import replace

    from examples.addition import load_splits

    return replace(load_splits(task_config, seed), test=[], dev=[])


@pytest.mark.parametrize("data, message", [
    ("tuple_splits", r"task.data=tests.unit.test_user_task:tuple_splits returned a tuple; return "
                     r"bt_ray.tasks.Splits\(train="),
    ("no_test_split", r"the dev split is empty \(every step is scored on it\)\n.*the test split is empty"),
])
def test_a_data_function_is_checked_before_any_work(tmp_path, data, message):
    config = load_config("examples/addition.yaml", [f"output_dir={tmp_path}", "name=u",
                                                    f"task.data=tests.unit.test_user_task:{data}"])
    with pytest.raises(ConfigError, match=message):
        Driver(config)
    assert not (tmp_path / "u").exists()


DOWNLOADED = {"yes": False}  # what `bt-ray data download` would change between a run and its resume


def data_that_changes(task_config, seed):
    from dataclasses import replace

    from examples.addition import load_splits

    splits = load_splits(task_config, seed)
    return replace(splits, train=splits.train[::-1], source="downloaded") if DOWNLOADED["yes"] else splits


def test_a_resume_on_other_data_is_refused(tmp_path, fake_trainer, monkeypatch):  # noqa: F811
    config = lambda *extra: load_config("examples/addition.yaml", [  # noqa: E731
        f"output_dir={tmp_path}", "name=u", "task.data=tests.unit.test_user_task:data_that_changes", *extra])
    solve = lambda request: "[[ ## reasoning ## ]]\nadd\n\n[[ ## answer ## ]]\n2\n\n"  # noqa: E731
    Driver(config("strategy=vanilla")).run(session=FakeSession(solve))
    Driver(config("strategy=p"), resume=True)  # same data: resumes
    monkeypatch.setitem(DOWNLOADED, "yes", True)
    with pytest.raises(ConfigError, match=r"made on other data \(examples/addition.py .*60/30/30.*\) than it would "
                                          r"continue on \(downloaded, 60/30/30"):
        Driver(config("strategy=p"), resume=True)
