"""The inference pool on a real local Ray cluster: two replicas, many callers, adapters on every replica."""

import time
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


def test_a_prompt_longer_than_the_context_fails_alone_naming_replica_and_request(session):
    from bt_ray.errors import BtRayError, RequestError

    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    too_long = GenerationRequest(({"role": "user", "content": "word " * 9000},), greedy, request_id="too-long")
    short = GenerationRequest(({"role": "user", "content": "Say hi."},), greedy, request_id="short")
    with ThreadPoolExecutor(2) as threads:
        refused, answered = threads.submit(session.pool.generate, too_long), threads.submit(session.pool.generate, short)
        with pytest.raises(RequestError, match=r"replica-\d refused request too-long .*RequestError: prompt of 90\d\d "
                                               r"tokens does not fit the model's context of 8192") as err:
            refused.result()
        assert answered.result().completion_tokens > 0
    assert not isinstance(err.value, BtRayError)  # the fan-out scores its example as failed and goes on


def random_lora(model_dir, path) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return str(path)


def test_a_killed_replica_loses_no_request_and_is_replaced_with_every_adapter(session, model_dir, tmp_path):
    """Near the end of this module: it kills replica-0 of the shared session."""
    import ray

    pool = session.pool
    pool.load_adapter("pooltest-v1", random_lora(model_dir, tmp_path / "lora"))
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    requests = [GenerationRequest(({"role": "user", "content": f"Count from {i} to {i + 5}."},), greedy,
                                  adapter="pooltest-v1" if i % 2 else None, request_id=f"k{i}") for i in range(40)]
    before, victim = pool.usage_snapshot(), pool.replicas["replica-0"]
    answered = []

    def call(request):
        result = pool.generate(request)
        answered.append(request.request_id)
        if len(answered) == 6:  # the others are queued or decoding on both replicas
            ray.kill(victim, no_restart=True)
        return result

    with ThreadPoolExecutor(8) as threads:
        results = list(threads.map(call, requests))
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert [r.adapter for r in results] == [r.adapter for r in requests]
    assert pool.usage_snapshot().since(before).requests == 40  # each answered request counted once
    assert [entry["replica"] for entry in pool.restarts] == ["replica-0"]

    for _ in range(240):  # the replacement joins once it has loaded every adapter version
        if len(pool.replicas) == 2:
            break
        time.sleep(0.5)
    assert pool.replicas["replica-0"] is not victim
    health = {h["replica"]: h for h in pool.health()}
    assert health["replica-0"]["adapters"] == ["pooltest-v1"]
    # Same greedy answers as before the kill, whichever replica serves them now.
    with ThreadPoolExecutor(8) as threads:
        again = list(threads.map(pool.generate, requests))
    assert [r.text for r in again] == [r.text for r in results]
    assert {h["replica"]: h["requests"] > 0 for h in pool.health()} == {"replica-0": True, "replica-1": True}


def test_a_replica_dead_when_an_adapter_loads_is_replaced_not_an_error(session, model_dir, tmp_path):
    """Last in this module: it kills replica-1. Loading a version, sleeping or waking skips a dead replica
    and its replacement joins with every version (the router may not have noticed the death yet)."""
    import ray

    pool = session.pool
    victim = pool.replicas["replica-1"]
    ray.kill(victim, no_restart=True)
    pool.load_adapter("pooltest-v2", random_lora(model_dir, tmp_path / "lora2"))
    assert pool.restarts[-1]["replica"] == "replica-1"
    for _ in range(240):
        if len(pool.replicas) == 2:
            break
        time.sleep(0.5)
    assert pool.replicas["replica-1"] is not victim
    health = {h["replica"]: h for h in pool.health()}
    assert sorted(health["replica-1"]["adapters"]) == ["pooltest-v1", "pooltest-v2"]
    request = GenerationRequest(({"role": "user", "content": "Say hi."},), SamplingParams(temperature=0.0,
                                max_tokens=4), adapter="pooltest-v2", request_id="after")
    assert pool.generate(request).adapter == "pooltest-v2"


def test_a_replica_that_cannot_start_is_named_and_holds_nothing_afterwards(ray_cluster, model_dir, tmp_path):
    """A checkpoint folder without weights: the start fails naming the replica, model.name and the actor's cause,
    and its actor and placement group are gone (a retry in the same process can place again)."""
    import shutil

    from ray.util import placement_group_table

    from bt_ray.errors import EngineError

    bad = tmp_path / "no-weights"
    bad.mkdir()
    shutil.copy(f"{model_dir}/config.json", bad)
    config = load_config(None, [f"model.name={bad}", "inference.replicas=1", "inference.cpus_per_replica=0.5",
                                "inference.torch_threads=1", f"output_dir={tmp_path}"])
    with pytest.raises(EngineError, match=r"(?s)inference replica-0 of .broken. failed to start .*no-weights.*"
                                          r"ActorDiedError.*Check model.name"):
        Session(config, "broken").start()
    groups = [g["state"] for g in placement_group_table().values() if g["name"] == "broken/replicas"]
    assert groups == ["REMOVED"], groups
