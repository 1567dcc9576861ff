"""200 concurrent requests from 16 threads through a real Ray pool: every answer reaches its own caller.

The replicas run the FakeEngine (labelled test engine: its answer is a hash of the request's
last message and model version), so every answer can be checked exactly; routing, actors,
adapters and threads are real.
"""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bt_ray.config import load_config
from bt_ray.inference.engine import GenerationRequest
from bt_ray.inference.fake import echo_responder
from bt_ray.session import Session

pytestmark = pytest.mark.integration


def test_200_concurrent_requests_none_lost_or_swapped(ray_cluster, tmp_path):
    config = load_config(None, ["inference.engine=fake", "inference.replicas=2", "inference.cpus_per_replica=0.5",
                                f"output_dir={tmp_path}"])
    with Session(config, "concurrency") as session:
        pool = session.pool
        pool.load_adapter("concurrency-v1", str(tmp_path))  # the fake engine only records the name
        requests = [GenerationRequest(({"role": "system", "content": f"program {i % 7}"},
                                       {"role": "user", "content": f"question {i}"}),
                                      adapter="concurrency-v1" if i % 3 == 0 else None) for i in range(200)]
        with ThreadPoolExecutor(16) as threads:
            results = list(threads.map(pool.generate, requests))
        assert [r.text for r in results] == [echo_responder(r) for r in requests]
        assert [r.adapter for r in results] == [r.adapter for r in requests]
        assert len({r.request_id for r in results}) == 200
        assert pool.usage_snapshot().requests == 200
        served = [h["served"] for h in pool.health()]
        assert len(served) == 2 and sum(served) == 200 and min(served) > 0, served
        assert pool.router.load() == {"replica-0": 0, "replica-1": 0}


def test_a_busy_replica_is_waited_for_and_a_hung_one_is_named(ray_cluster, tmp_path):
    """request_timeout_s detects a replica that stopped working, not one with a long queue."""
    from bt_ray.errors import EngineError

    config = load_config(None, ["inference.engine=fake", "inference.cpus_per_replica=0.5",
                                "inference.request_timeout_s=1", f"output_dir={tmp_path}"])
    with Session(config, "timeouts") as session:
        pool = session.pool
        slow = GenerationRequest(({"role": "user", "content": "fake-sleep:4 slow question"},), request_id="slow")
        quick = GenerationRequest(({"role": "user", "content": "fake-sleep:0.2 quick"},))
        with ThreadPoolExecutor(2) as threads:
            waiting = threads.submit(pool.generate, slow)
            served = 0
            while not waiting.done():  # other requests keep finishing on the same replica while `slow` waits
                pool.generate(quick)
                served += 1
            assert waiting.result().request_id == "slow"  # 4 s > request_timeout_s, answered anyway
            assert served >= 10
        hung = GenerationRequest(({"role": "user", "content": "fake-sleep:30 hung"},), request_id="hung")
        with pytest.raises(EngineError, match=r"replica-0 gave no answer to request hung .*stood still"):
            pool.generate(hung)


def test_a_version_that_fails_on_one_replica_is_on_none_afterwards(ray_cluster, tmp_path):
    """FakeEngine (test engine): the folder's `fake-fail-once` file fails the load on exactly one replica."""
    from bt_ray.errors import AdapterError
    from bt_ray.inference.fake import FAIL_ONCE

    config = load_config(None, ["inference.engine=fake", "inference.replicas=2", "inference.cpus_per_replica=0.5",
                                f"output_dir={tmp_path}"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / FAIL_ONCE).touch()
    with Session(config, "halfload") as session:
        pool = session.pool
        with pytest.raises(AdapterError, match=r"1 of 2 replica\(s\) failed to load adapter 'halfload-v1' .*"
                                               r"replica-\d: .*fake-fail-once.* \(undone on replica-\d, where it "
                                               r"had succeeded\)"):
            pool.load_adapter("halfload-v1", str(adapter))
        assert pool.adapters == {}
        assert [h["adapters"] for h in pool.health()] == [[], []]  # not left on the replica where it loaded
        pool.load_adapter("halfload-v2", str(adapter))  # the next version loads everywhere
        assert [h["adapters"] for h in pool.health()] == [["halfload-v2"], ["halfload-v2"]]


def test_a_replica_that_does_not_answer_a_load_in_time_is_replaced_and_the_version_is_on_none(ray_cluster,
                                                                                               tmp_path):
    """FakeEngine (test engine): `fake-hang-once` makes one replica load 6 s late, past a 3 s timeout."""
    from bt_ray.errors import AdapterError
    from bt_ray.inference.fake import HANG_ONCE

    config = load_config(None, ["inference.engine=fake", "inference.replicas=2", "inference.cpus_per_replica=0.5",
                                "inference.request_timeout_s=3", f"output_dir={tmp_path}"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / HANG_ONCE).write_text("6")
    with Session(config, "lateload") as session:
        pool = session.pool
        with pytest.raises(AdapterError, match=r"1 of 2 replica\(s\) failed to load adapter 'lateload-v1' .*"
                                               r"replica-\d: ReplicaHung: no answer in inference.request_timeout_s"
                                               r"=3s; killed and replaced.* \(undone on replica-\d") as failed:
            pool.load_adapter("lateload-v1", str(adapter))
        hung = re.search(r"(replica-\d): ReplicaHung", str(failed.value)).group(1)
        assert [r["replica"] for r in pool.restarts] == [hung]
        time.sleep(6)  # the late load would have finished by now on the replica that was not killed
        deadline = time.monotonic() + 60
        while len(pool.replicas) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pool.adapters == {}
        assert [h["adapters"] for h in pool.health()] == [[], []]
        pool.load_adapter("lateload-v2", str(adapter))  # the replacement serves the next version
        assert [h["adapters"] for h in pool.health()] == [["lateload-v2"], ["lateload-v2"]]


def test_a_replica_where_a_failed_version_cannot_be_unloaded_is_replaced(ray_cluster, tmp_path):
    """FakeEngine (test engine): `fake-fail-once` fails the load on one replica, `fake-fail-unload-once` then
    fails its undo on the other: that one is killed and replaced, and the version is left on none."""
    from bt_ray.errors import AdapterError
    from bt_ray.inference.fake import FAIL_ONCE, FAIL_UNLOAD_ONCE

    config = load_config(None, ["inference.engine=fake", "inference.replicas=2", "inference.cpus_per_replica=0.5",
                                f"output_dir={tmp_path}"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / FAIL_ONCE).touch()
    (adapter / FAIL_UNLOAD_ONCE).touch()
    with Session(config, "stuckload") as session:
        pool = session.pool
        with pytest.raises(AdapterError, match=r"1 of 2 replica\(s\) failed to load adapter 'stuckload-v1' .*"
                                               r"\(undone on 0 of 1 replica\(s\) where it had succeeded; "
                                               r"replica-\d could not be put back: killed and "
                                               r"replaced") as failed:
            pool.load_adapter("stuckload-v1", str(adapter))
        stuck = re.search(r"(replica-\d) could not be put back", str(failed.value)).group(1)
        assert [r["replica"] for r in pool.restarts] == [stuck]
        deadline = time.monotonic() + 60
        while len(pool.replicas) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pool.adapters == {}
        assert [h["adapters"] for h in pool.health()] == [[], []]
        pool.load_adapter("stuckload-v2", str(adapter))
        assert [h["adapters"] for h in pool.health()] == [["stuckload-v2"], ["stuckload-v2"]]
