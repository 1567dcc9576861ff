"""Π→Θ on GSM8K (offline problems) and HotPotQA (offline two-hop questions + real BM25 retrieval),
with the shipped model, a real local Ray cluster and real DSPy, on tiny subsamples."""

import pytest

from bt_ray.config import load_config
from bt_ray.driver import Driver

pytestmark = pytest.mark.integration

TINY = [
    "strategy=p -> w", "task.source=offline",
    "prompt.num_candidates=3", "inference.cpus_per_replica=1", "train.cpus_per_worker=1",
    # Few traces: every parsed trace is kept, one short epoch; the point is the data path, not the score.
    "train.epochs=1", "train.batch_size=2", "train.metric_threshold=0", "train.learning_rate=5e-4",
]


def _run(config_file, out, name, *extra):
    config = load_config(config_file, [*TINY, f"output_dir={out}", f"name={name}", *extra])
    return config, Driver(config).run()


@pytest.fixture(scope="module")
def gsm_run(ray_cluster, tmp_path_factory):
    return _run("configs/gsm8k.yaml", tmp_path_factory.mktemp("runs"), "gsm",
                "task.train_size=8", "task.dev_size=4", "task.test_size=4",
                "prompt.train_size=4", "prompt.val_size=4", "inference.max_tokens=128")


@pytest.fixture(scope="module")
def hotpot_run(ray_cluster, tmp_path_factory):
    return _run("configs/hotpotqa.yaml", tmp_path_factory.mktemp("runs"), "hotpot",
                "task.train_size=6", "task.dev_size=3", "task.test_size=3", "inference.max_tokens=64")


def _check_p_then_w(config, results, name):
    steps = results["steps"]
    assert [s["strategy"] for s in steps] == ["vanilla", "Π", "Π→Θ"]
    assert [s["version"] for s in steps] == ["base", "base", f"{name}-v1"]
    assert set(steps[2]["requests_by_version"]) <= {"base", f"{name}-v1"}
    assert results["test"]["step"] == 2 and results["test"]["n"] == results["data"]["test"]
    assert results["data"]["offline"] is True
    assert "**OFFLINE stand-in**" in (config.run_dir / "results.md").read_text()


def test_gsm8k_offline_p_w(gsm_run):
    config, results = gsm_run
    _check_p_then_w(config, results, "gsm")
    theta = results["steps"][2]["details"]
    assert theta["per_predictor"] == {"prog.predict": theta["traces_kept"]}
    assert "reasoning-gym" in results["data"]["source"]


def test_hotpotqa_offline_p_w_with_bm25(hotpot_run):
    config, results = hotpot_run
    _check_p_then_w(config, results, "hotpot")
    theta = results["steps"][2]["details"]
    kept = theta["traces_kept"]
    # every kept trace ran all three predictors once: Θ's data is assigned to each by identity
    assert theta["per_predictor"] == {"generate_query[0].predict": kept, "generate_query[1].predict": kept,
                                      "generate_answer.predict": kept}
    assert theta["examples"] == 3 * kept
    # Π ran on the offline split, shrunk to fit it (18 train questions at most, here 6)
    pi = results["steps"][1]["details"]
    assert pi["train_size"] + pi["val_size"] <= 6
