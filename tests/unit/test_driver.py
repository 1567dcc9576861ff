"""The phase loop, checkpoints and resume, over a fake engine and a fake trainer (labelled; no Ray, no model)."""

import json
from types import SimpleNamespace

import pytest

import bt_ray.phases.prompt as prompt_phase
from bt_ray.config import load_config
from bt_ray.driver import Driver
from bt_ray.errors import ConfigError, TrainingError

from .fakes import FakeSession
from .test_prompt_phase import noisy_classifier


class Calls(list):
    inits: list
    timeouts: list


@pytest.fixture
def fake_trainer(monkeypatch, tmp_path):
    calls, inits, timeouts = Calls(), [], []

    def train_lora(examples, config, base_model_dir, output_dir, name, seed=0, init_adapter_dir=None,
                   gpus_per_worker=0.0, placement_timeout_s=300.0):
        calls.append(name)
        inits.append(init_adapter_dir)
        timeouts.append(placement_timeout_s)
        return SimpleNamespace(adapter_dir=f"{output_dir}/adapter", examples=len(examples), dropped=0,
                               trained_tokens=100 * len(examples), total_tokens=300 * len(examples), steps=2,
                               losses=[2.0, 1.5], wall_s=0.1, workers=1)

    monkeypatch.setattr("bt_ray.phases.finetune.train_lora", train_lora)
    calls.inits, calls.timeouts = inits, timeouts
    return calls


def _config(tmp_path, *extra):
    return load_config("configs/iris.yaml", [f"output_dir={tmp_path}", "name=t", *extra])


def test_p_w_p_runs_every_step_and_binds_pi_after_theta_to_the_adapter(tmp_path, fake_trainer):
    results = Driver(_config(tmp_path)).run(session=FakeSession(noisy_classifier))
    steps = results["steps"]
    assert [s["strategy"] for s in steps] == ["vanilla", "Π", "Π→Θ", "Π→Θ→Π"]
    assert [s["version"] for s in steps] == ["base", "base", "t-v1", "t-v1"]
    assert set(steps[3]["requests_by_version"]) == {"t-v1"}  # Π after Θ ran on the adapter only
    assert set(steps[1]["requests_by_version"]) == {"base"}
    assert fake_trainer == ["t-v1"]
    assert results["test"]["step"] == 3 and results["test"]["n"] == 50
    assert steps[2]["trained_tokens"] > 0 and steps[2]["details"]["traces_kept"] > 0
    run_dir = tmp_path / "t"
    for name in ("results.json", "results.md", "scores.png", "config.yaml", "state.json", "events.jsonl"):
        assert (run_dir / name).exists(), name
    assert "| 3 | Π→Θ→Π | t-v1 |" in (run_dir / "results.md").read_text()


def test_resume_after_theta_does_not_retrain(tmp_path, fake_trainer, monkeypatch):
    real = prompt_phase.optimize_prompts
    calls = {"n": 0}

    def dies_on_second_pi(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed in the middle of the second Π")
        return real(*args, **kwargs)

    monkeypatch.setattr("bt_ray.driver.optimize_prompts", dies_on_second_pi)
    with pytest.raises(KeyboardInterrupt):
        Driver(_config(tmp_path)).run(session=FakeSession(noisy_classifier))
    state = json.loads((tmp_path / "t" / "state.json").read_text())
    assert [s["index"] for s in state["steps"]] == [0, 1, 2]

    with pytest.raises(ConfigError, match="--resume"):
        Driver(_config(tmp_path))  # refuses to overwrite finished work
    session = FakeSession(noisy_classifier)
    results = Driver(_config(tmp_path), resume=True).run(session=session)
    assert fake_trainer == ["t-v1"]  # Θ was not run again
    assert session.pool.adapters == {"t-v1": str(tmp_path / "t" / "steps" / "02-w" / "adapter")}
    assert len(results["steps"]) == 4 and results["test"]["step"] == 3


def test_resume_refuses_a_different_config(tmp_path, fake_trainer):
    Driver(_config(tmp_path, "strategy=p")).run(session=FakeSession(noisy_classifier))
    with pytest.raises(ConfigError, match="train.learning_rate"):
        Driver(_config(tmp_path, "strategy=p", "train.learning_rate=1e-3"), resume=True)
    with pytest.raises(ConfigError, match="not a prefix"):
        Driver(_config(tmp_path, "strategy=w", "inference.max_inflight=8"), resume=True)
    saved = load_config(tmp_path / "t" / "config.yaml")  # a refused resume writes nothing
    assert (saved.strategy, saved.inference.max_inflight) == ("p", load_config(None).inference.max_inflight)


def test_each_step_is_costed_at_what_the_run_held_while_computing_it(tmp_path, fake_trainer):
    from bt_ray import costs
    from bt_ray.table1 import find_runs

    for strategy, pool in (("p", ["inference.replicas=1", "inference.cpus_per_replica=1"]),
                           ("p -> w", ["inference.replicas=4", "inference.cpus_per_replica=2"])):  # resumed bigger
        config = _config(tmp_path, f"strategy={strategy}", *pool)
        Driver(config, resume=strategy != "p").run(session=FakeSession(noisy_classifier, config=config))
    phases = {c.step: c for c in costs.phase_costs(find_runs(tmp_path, {})[0]) if c.step is not None}
    train = phases[2].train_wall_s  # Θ's training workers: train.cpus_per_worker x num_workers = 1 CPU
    assert [phases[i].cpu_s for i in (0, 1, 2)] == pytest.approx(
        [1 * phases[0].wall_s, 1 * phases[1].wall_s, 8 * phases[2].wall_s + 1 * train], abs=0.1)


def test_resume_accepts_the_keys_bt_rays_own_errors_tell_you_to_raise(tmp_path, fake_trainer):
    Driver(_config(tmp_path, "strategy=p")).run(session=FakeSession(noisy_classifier))
    raised = ["placement.timeout_s=900", "inference.replica_restarts=10", "inference.request_retries=5",
              "inference.continuous_batching=false", "train.max_failures=2"]
    Driver(_config(tmp_path, "strategy=p -> w", *raised), resume=True).run(session=FakeSession(noisy_classifier))
    assert fake_trainer == ["t-v1"]


def test_best_dev_selection_prefers_earlier_step_on_ties(tmp_path, fake_trainer):
    results = Driver(_config(tmp_path, "strategy=p -> p", "returned=best_dev")).run(
        session=FakeSession(noisy_classifier))
    devs = [s["dev"] for s in results["steps"]]
    best = max(range(len(devs)), key=lambda i: (devs[i], -i))
    assert results["test"]["step"] == best


def test_theta_with_no_passing_traces_fails_clearly(tmp_path, fake_trainer):
    always_wrong = lambda request: "[[ ## reasoning ## ]]\nno\n\n[[ ## answer ## ]]\ndaisy\n\n"  # noqa: E731
    with pytest.raises(TrainingError, match=r"no traces passed the metric .*\(0 of 50 raised.*'p' step first.*larger model"):
        Driver(_config(tmp_path, "strategy=w")).run(session=FakeSession(always_wrong))
    events = (tmp_path / "t" / "events.jsonl").read_text()
    assert '"event": "failed"' in events and (tmp_path / "t" / "state.json").exists()


def test_vanilla_strategy_scores_zero_shot_on_test(tmp_path, fake_trainer):
    results = Driver(_config(tmp_path, "strategy=vanilla")).run(session=FakeSession(noisy_classifier))
    assert len(results["steps"]) == 1 and results["test"]["step"] == 0


def test_theta_after_theta_keeps_training_the_current_adapter(tmp_path, fake_trainer):
    config = _config(tmp_path, "strategy=p -> w -> w", "placement.timeout_s=45")
    results = Driver(config).run(session=FakeSession(noisy_classifier, config=config))
    assert fake_trainer == ["t-v1", "t-v2"]
    assert fake_trainer.inits == [None, results["steps"][2]["details"]["adapter_dir"]]
    assert fake_trainer.timeouts == [45.0, 45.0]  # placement.timeout_s bounds the wait for training workers too
    assert set(results["steps"][3]["requests_by_version"]) <= {"t-v1", "t-v2"}
    assert results["steps"][3]["version"] == "t-v2"
