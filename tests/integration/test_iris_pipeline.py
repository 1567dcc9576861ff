"""Π→Θ→Π on Iris with the shipped model, a real local Ray cluster and real DSPy (small subsamples)."""

import json

import pytest

from bt_ray.config import load_config
from bt_ray.driver import Driver
from bt_ray.inference.engine import GenerationRequest, SamplingParams
from bt_ray.session import Session, chat_adapter
from bt_ray.tasks import get_task

pytestmark = pytest.mark.integration

SMALL = [
    "task.train_size=30", "task.dev_size=10", "task.test_size=10",
    "prompt.train_size=10", "prompt.val_size=8", "prompt.num_candidates=3",
    "inference.max_tokens=80", "inference.cpus_per_replica=1", "train.cpus_per_worker=1",
    # A few traces only: small batches and a larger step so 2 epochs visibly move the weights.
    "train.epochs=2", "train.learning_rate=5e-4", "train.batch_size=2", "train.metric_threshold=0",
]


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory):
    """`p -> w`, then resumed as `p -> w -> p`: the second run must reuse Π and Θ."""
    out = tmp_path_factory.mktemp("runs")
    first = load_config("configs/iris.yaml", [*SMALL, f"output_dir={out}", "name=it", "strategy=p -> w"])
    Driver(first).run()
    second = load_config("configs/iris.yaml", [*SMALL, f"output_dir={out}", "name=it", "strategy=p -> w -> p"])
    results = Driver(second, resume=True).run()
    return second, results


def test_every_step_scored_and_test_once(finished_run):
    config, results = finished_run
    assert [s["strategy"] for s in results["steps"]] == ["vanilla", "Π", "Π→Θ", "Π→Θ→Π"]
    assert all(s["dev_n"] == 10 for s in results["steps"])
    assert results["test"]["n"] == 10 and results["test"]["step"] == 3
    assert (config.run_dir / "scores.png").stat().st_size > 0


def test_pi_after_theta_ran_with_the_adapter(finished_run):
    _, results = finished_run
    after = results["steps"][3]
    assert after["version"] == "it-v1"
    assert set(after["requests_by_version"]) == {"it-v1"}, after["requests_by_version"]
    assert set(results["steps"][1]["requests_by_version"]) == {"base"}


def test_resume_after_theta_did_not_retrain(finished_run):
    config, _ = finished_run
    events = [json.loads(line) for line in (config.run_dir / "events.jsonl").read_text().splitlines()]
    starts = [e["step"] for e in events if e["event"] == "start"]
    assert starts.count(2) == 1 and starts.count(3) == 1  # Θ started once, in the first run only


def test_trained_adapter_lowered_the_loss_and_changes_outputs(finished_run):
    config, results = finished_run
    theta = results["steps"][2]["details"]
    assert theta["train"]["last_loss"] < theta["train"]["first_loss"]

    # The Π program's real prompts (instructions + demos + an Iris example), greedy, base vs adapter.
    program = get_task("iris").build_program()
    program.load(str(config.run_dir / "steps" / "01-p" / "program.json"))
    predictor = program.predictors()[0]
    splits = get_task("iris").load_splits(config.task, config.seed)
    prompts = [tuple(chat_adapter().format(predictor.signature, predictor.demos, ex.inputs().toDict()))
               for ex in splits.dev[:6]]
    greedy = SamplingParams(temperature=0.0, max_tokens=48)
    check = load_config("configs/iris.yaml", [*SMALL, f"output_dir={config.output_dir}", "name=check"])
    with Session(check, "check") as session:
        session.pool.load_adapter("check-v1", theta["adapter_dir"])
        ask = lambda adapter: [session.pool.generate(GenerationRequest(p, greedy, adapter=adapter)).text  # noqa
                               for p in prompts]
        base, tuned, again = ask(None), ask("check-v1"), ask(None)
    assert base == again  # loading the adapter left the base model untouched
    assert tuned != base, "the trained adapter did not change any output"


def test_report_of_the_run(finished_run, tmp_path):
    """`bt-ray report` on the real run above: no second model run, only the report's files."""
    import csv

    from bt_ray.cli import main

    config, results = finished_run
    assert main(["report", str(config.run_dir), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "table1.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["task"], row["model"], row["strategy"], row["n"]) == ("iris", "smollm2-135m", "Π→Θ→Π", "1")
    assert float(row["mean"]) == pytest.approx(results["test"]["score"]) and row["paper"] == ""
    with open(tmp_path / "costs.csv") as f:
        costs = {r["phase"] + r["step"]: r for r in csv.DictReader(f)}
    theta = results["steps"][2]
    # cpus_per_replica=1 for the whole step, plus cpus_per_worker=1 while Ray Train ran.
    assert float(costs["w2"]["cpu_s"]) == pytest.approx(theta["wall_s"] + theta["details"]["train"]["wall_s"], abs=0.2)
    assert float(costs["test"]["wall_s"]) > 0
    for name in ("scores.png", "phases.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
