"""The inference pool on a real local Ray cluster: two replicas, many callers, adapters on every replica."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from bt_ray.config import load_config
from bt_ray.errors import AdapterError
from bt_ray.inference.engine import GenerationRequest, SamplingParams
from bt_ray.session import Session

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def session(ray_cluster, tmp_path_factory):
    config = load_config(None, ["inference.replicas=2", "inference.cpus_per_replica=0.5",
                                "inference.torch_threads=1", f"output_dir={tmp_path_factory.mktemp('pool')}"])
    with Session(config, "pooltest") as s:
        yield s


def test_many_callers_each_get_their_own_answer_from_both_replicas(session):
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    requests = [GenerationRequest(({"role": "user", "content": f"Repeat the number {i} and stop."},), greedy,
                                  request_id=f"r{i}") for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(session.pool.generate, requests))
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    alone = session.pool.generate(requests[5])
    assert alone.text == results[5].text  # same request, same greedy answer, whatever batch it rode in
    served = {h["replica"]: h["requests"] for h in session.pool.health()}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served
    assert session.pool.router.load() == {"replica-0": 0, "replica-1": 0}


def test_unknown_version_is_refused_before_any_replica_sees_it(session):
    request = GenerationRequest(({"role": "user", "content": "hi"},), adapter="pooltest-v9")
    with pytest.raises(AdapterError, match="pooltest-v9"):
        session.pool.generate(request)
