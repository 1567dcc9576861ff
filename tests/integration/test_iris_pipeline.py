"""Π→Θ→Π on Iris with the shipped model, a real local Ray cluster and real DSPy (small subsamples)."""

import json

import pytest

from bt_ray.config import load_config
from bt_ray.driver import Driver
from bt_ray.inference.engine import GenerationRequest, SamplingParams
from bt_ray.session import Session

pytestmark = pytest.mark.integration

SMALL = [
    "task.train_size=30", "task.dev_size=15", "task.test_size=15",
    "prompt.train_size=10", "prompt.val_size=12", "prompt.num_candidates=4",
    "inference.max_tokens=80", "inference.cpus_per_replica=1", "train.cpus_per_worker=1",
    "train.epochs=2", "train.learning_rate=1e-4", "train.metric_threshold=0",
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
    assert all(s["dev_n"] == 15 for s in results["steps"])
    assert results["test"]["n"] == 15 and results["test"]["step"] == 3
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


def test_trained_adapter_changes_outputs(finished_run):
    config, results = finished_run
    adapter_dir = results["steps"][2]["details"]["adapter_dir"]
    check = load_config("configs/iris.yaml", [*SMALL, f"output_dir={config.output_dir}", "name=check"])
    prompts = [[{"role": "user", "content": f"Petal length {x} cm, petal width {y} cm: which iris species?"}]
               for x, y in [(1.4, 0.2), (4.5, 1.5), (6.0, 2.2)]]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    with Session(check, "check") as session:
        session.pool.load_adapter("check-v1", adapter_dir)
        base = [session.pool.generate(GenerationRequest(tuple(p), greedy)).text for p in prompts]
        tuned = [session.pool.generate(GenerationRequest(tuple(p), greedy, adapter="check-v1")).text
                 for p in prompts]
        again = [session.pool.generate(GenerationRequest(tuple(p), greedy)).text for p in prompts]
    assert base == again  # the base model is untouched by loading the adapter
    assert tuned != base, "the trained adapter did not change any output"
