"""Faults during a real run (shipped model, real Ray, real DSPy): a replica dies in Π, the driver dies in Θ."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bt_ray.config import load_config
from bt_ray.driver import Driver
from bt_ray.session import Session

pytestmark = pytest.mark.integration

TINY = ["task.train_size=10", "task.dev_size=6", "task.test_size=4", "prompt.train_size=4", "prompt.val_size=5",
        "prompt.num_candidates=3", "inference.max_tokens=40"]


def events(run_dir) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_replica_killed_in_the_middle_of_pi_costs_no_example(ray_cluster, tmp_path):
    import ray

    config = load_config("configs/iris.yaml", [*TINY, "strategy=p", "name=kill-replica", f"output_dir={tmp_path}",
                                               "inference.replicas=2", "inference.cpus_per_replica=0.5",
                                               "inference.torch_threads=1"])
    driver = Driver(config)
    session = Session(config, config.run_name, cache_dir=config.run_dir / "cache")
    killed, pool = threading.Event(), []

    def kill_in_pi():
        while not any(e["event"] == "start" and e["step"] == 1 for e in events(config.run_dir)):
            time.sleep(0.2)
        pool.append(session.pool)
        start = pool[0].usage_snapshot().requests
        while pool[0].usage_snapshot().requests < start + 4:  # Π is bootstrapping
            time.sleep(0.1)
        ray.kill(pool[0].replicas["replica-1"], no_restart=True)
        killed.set()

    threading.Thread(target=kill_in_pi, daemon=True).start()
    results = driver.run(session=session)
    assert killed.is_set()
    assert [r["replica"] for r in pool[0].restarts] == ["replica-1"]
    pi = results["steps"][1]
    assert pi["strategy"] == "Π" and all(s["dev_n"] == 6 for s in results["steps"])
    # Every candidate was scored on every validation example: none lost to the dead replica.
    assert [c["n"] for c in pi["details"]["candidates"]] == [5, 5, 5]
    assert results["test"]["n"] == 4


def test_driver_killed_in_theta_resumes_without_recomputing_finished_steps(ray_cluster, tmp_path):
    overrides = [*TINY, "strategy=p -> w", "name=kill-driver", f"output_dir={tmp_path}", "train.epochs=2",
                 "train.batch_size=2", "train.metric_threshold=0", "inference.cpus_per_replica=1"]
    run_dir = tmp_path / "kill-driver"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "bt_ray.cli", "run", "configs/iris.yaml", *overrides], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not any(e["event"] == "start" and e["step"] == 2 for e in events(run_dir)):
            assert driver.poll() is None and time.time() < deadline, "the driver ended before Θ started"
            time.sleep(0.2)
        time.sleep(3)  # Θ is collecting traces or training
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert not any(e["event"] == "done" and e["step"] == 2 for e in events(run_dir))

    config = load_config("configs/iris.yaml", overrides)
    results = Driver(config, resume=True).run()
    starts = [e["step"] for e in events(run_dir) if e["event"] == "start"]
    assert starts == [1, 2, 2]  # Θ started twice: killed, then resumed; Π and the baseline ran once
    assert [e["step"] for e in events(run_dir) if e["event"] == "done"] == [0, 1, 2]
    assert [s["strategy"] for s in results["steps"]] == ["vanilla", "Π", "Π→Θ"]
    assert results["steps"][2]["version"] == "kill-driver-v1" and results["test"]["n"] == 4
