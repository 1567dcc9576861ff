"""Placement groups on a real local Ray cluster (2 CPUs): a group that cannot be placed fails in time,
naming what was asked and what the cluster has; replicas sleep and wake (FakeEngine: no model)."""

import time

import pytest

from bt_ray.config import load_config
from bt_ray.errors import EngineError, ResourceError
from bt_ray.inference import placement
from bt_ray.inference.engine import GenerationRequest
from bt_ray.inference.pool import InferencePool

pytestmark = pytest.mark.integration


def test_more_cpus_than_the_cluster_has_fail_within_the_timeout(ray_cluster):
    started = time.monotonic()
    with pytest.raises(ResourceError) as err:
        placement.reserve([{"CPU": 3.0}, {"CPU": 3.0}], "too-big", 2.0, "2 test replicas")
    assert time.monotonic() - started < 30  # it did not hang
    message = str(err.value)
    assert "2 test replicas" in message and "placement.timeout_s=2s" in message
    assert "2 x {3 CPU} = 6 CPU" in message and "the Ray cluster has 2 CPU" in message


def test_a_resource_nobody_has_is_named(ray_cluster):
    with pytest.raises(ResourceError, match=r"= 0.5 CPU, 1 special_hw.*0 special_hw free"):
        placement.reserve([{"CPU": 0.5, "special_hw": 1.0}], "no-hw", 1.0, "a special_hw replica")
    group = placement.reserve([{"CPU": 0.5}], "fits", 30.0, "a small replica")  # the failed one left nothing held
    placement.release(group)


def test_pool_replicas_sleep_and_wake(ray_cluster, tmp_path):
    config = load_config(None, ["inference.engine=fake", "inference.cpus_per_replica=0.25", "inference.replicas=2",
                                f"output_dir={tmp_path}", "placement.timeout_s=30"])
    pool = InferencePool(config, "unused-model-dir", "sleeptest")
    pool.start()
    try:
        request = GenerationRequest(({"role": "user", "content": "hi"},))
        assert pool.generate(request).text
        pool.sleep()
        assert [h["asleep"] for h in pool.health()] == [True, True]
        with pytest.raises(EngineError, match="pool is asleep"):
            pool.generate(request)
        pool.wake()
        assert [h["asleep"] for h in pool.health()] == [False, False]
        assert pool.generate(request).text
    finally:
        pool.shutdown()
    assert pool.group is None


def test_a_replica_lost_while_the_pool_sleeps_is_replaced_only_after_wake(ray_cluster, tmp_path):
    """Timeshare: while the replicas sleep, Θ trains on their GPUs, so a replacement must not start an engine
    there until wake(). FakeEngine: no model."""
    import ray

    config = load_config(None, ["inference.engine=fake", "inference.cpus_per_replica=0.25", "inference.replicas=2",
                                f"output_dir={tmp_path}", "placement.timeout_s=30"])
    pool = InferencePool(config, "unused-model-dir", "gate")
    pool.start()
    try:
        pool.sleep()
        ray.kill(pool.replicas["replica-0"])
        time.sleep(1.0)
        pool.load_adapter("gate-v1", str(tmp_path))  # finds replica-0 dead: its replacement is due
        time.sleep(2.0)
        named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if isinstance(a, dict)}
        assert "replica-0" in pool._replacing and pool._spawning == 0 and "gate/replica-2" not in named
        pool.wake()
        deadline = time.monotonic() + 60
        while "replica-0" not in pool.replicas and time.monotonic() < deadline:
            time.sleep(0.5)
        health = {h["replica"]: h for h in pool.health()}
        assert health["replica-0"]["asleep"] is False and "gate-v1" in health["replica-0"]["adapters"]
    finally:
        pool.shutdown()


def test_a_replica_that_fails_to_wake_is_replaced_and_the_pool_serves(ray_cluster, tmp_path):
    """FakeEngine (test engine): `fake-fail-wake-once` in its model dir fails wake() on exactly one replica."""
    from bt_ray.inference.fake import FAIL_WAKE_ONCE

    config = load_config(None, ["inference.engine=fake", "inference.cpus_per_replica=0.25", "inference.replicas=2",
                                f"output_dir={tmp_path}", "placement.timeout_s=30"])
    pool = InferencePool(config, str(tmp_path), "wakefail")
    pool.start()
    try:
        pool.load_adapter("wakefail-v1", str(tmp_path))
        pool.sleep()
        (tmp_path / FAIL_WAKE_ONCE).touch()
        pool.wake()  # not an error: the replica that stayed asleep is replaced
        assert len(pool.restarts) == 1 and FAIL_WAKE_ONCE in pool.restarts[0]["cause"]
        request = GenerationRequest(({"role": "user", "content": "hi"},), adapter="wakefail-v1")
        assert pool.generate(request).text  # the replica that woke serves meanwhile
        deadline = time.monotonic() + 60
        while len(pool.replicas) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [(h["asleep"], h["adapters"]) for h in pool.health()] == [(False, ["wakefail-v1"])] * 2
    finally:
        pool.shutdown()
