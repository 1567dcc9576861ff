"""bench/gpu_serving.py's arms (b), (b~), (b+) and (c) on CPU, so that a GPU run does not find their bugs first.

The replica runs the FakeEngine (labelled test engine: no model, answers in DSPy's format) instead of
vLLM; the pool, router, Ray actors, the bench's requests and its rank-32 q,k adapter on Llama-3-8B
shapes are the real ones. Arm (a), raw vLLM, needs vLLM and a GPU (tests/gpu, scripts/gpu_check.sh).
"""

import sys
from pathlib import Path

import pytest

from bt_ray.config import load_config

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_arms_b_and_c_run_through_the_pool_and_load_the_bench_adapter(ray_cluster, tmp_path):
    import gpu_serving

    from bt_ray.synthetic import random_lora, read_config

    adapter = random_lora(tmp_path / "lora-r32-qk", read_config(gpu_serving.ARCH), rank=32)
    config = load_config(None, ["inference.engine=fake", "inference.cpus_per_replica=0.5",
                                f"output_dir={tmp_path}"])
    arms, intervals = [], {}

    def on_arm(name, result):  # as each arm finishes: the replica's GIL switch interval it ran with
        replica = ray_cluster.get_actor("bench/replica-0")
        intervals[name] = ray_cluster.get(replica.__ray_call__.remote(lambda _: __import__("sys").getswitchinterval()))
        arms.append((name, result))

    base, lora = gpu_serving.through_pool(config, str(tmp_path), gpu_serving.requests(12), concurrency=4,
                                          warmup=2, adapter_dir=str(adapter), on_arm=on_arm)
    assert intervals == {"bt_ray": 0.005, "bt_ray_switch": 0.001, "bt_ray_queued": 0.005, "lora": 0.005}
    assert [name for name, _ in arms] == ["bt_ray", "bt_ray_switch", "bt_ray_queued", "lora"]
    assert arms[0][1] is base and arms[3][1] is lora
    switch, queued = arms[1][1], arms[2][1]
    assert base["engine_start_s"] >= 0 and all("engine_start_s" not in arm for arm in (switch, queued, lora))
    # (b+): 5 in flight (a quarter more than 4), each slot a fifth of the wall time per request
    assert abs(queued["per_request_s"]["slot"] - 5 * queued["wall_s"] / 12) < 0.01
    for arm in (base, switch, queued, lora):  # the FakeEngine counts words: every measured request answered
        assert arm["generated_tokens"] > 0 and arm["tokens_per_s"] > 0
        assert 0 < arm["latency_s"]["p50"] <= arm["latency_s"]["p90"] <= arm["latency_s"]["max"] <= arm["wall_s"] + 0.01
        parts = arm["per_request_s"]  # the replica's own clock: it took part of each request's latency
        assert parts["engine"] > 0 and parts["ray_path"] > 0 and parts["render"] == 0  # the FakeEngine renders none
        assert abs(sum(parts[k] for k in ("idle", "ray_path", "render", "engine")) - parts["slot"]) < 1e-3
        assert "engine_steps" not in arm  # only vLLM with inference.vllm.step_stats counts steps
    assert ray_cluster.is_initialized()  # the caller's cluster stays up
