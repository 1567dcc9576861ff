"""vLLM replicas serve LoRA versions correctly (real vLLM, real GPU): a trained adapter changes outputs
from the very next request, two versions side by side answer differently, a name is never reused, and
sleep frees the GPU and wakes with the same answers."""

import asyncio

import pytest

from bt_ray.config import InferenceConfig, TrainConfig, VLLMConfig
from bt_ray.errors import AdapterError
from bt_ray.inference.engine import GenerationRequest, SamplingParams
from bt_ray.synthetic import words

from tests.tiny import examples

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, stop=())
PROMPT = ({"role": "user", "content": words([100, 101, 102])},)
# Every linear layer: on random weights, q/k alone (attention only) cannot learn a fixed answer quickly.
TRAIN = TrainConfig(use_gpu=True, lora_rank=8, lora_alpha=16, epochs=6, learning_rate=1e-2, batch_size=4,
                    micro_batch_size=4, max_seq_len=128, cpus_per_worker=1.0,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def adapters(tiny_model, ray_gpu, tmp_path_factory):
    from bt_ray.train.trainer import train_lora

    out = tmp_path_factory.mktemp("adapters")
    return {word: train_lora(examples(word), TRAIN, tiny_model, str(out), name=f"w{word}", seed=word).adapter_dir
            for word in (7, 9)}


def wait_for_steady_gpu_memory(timeout_s: float = 60.0) -> None:
    """vLLM 0.26 fails its start-up memory profiling if another process (the training workers that just
    exited) frees GPU memory meanwhile (gpu_worker.py: "Error in memory profiling")."""
    import time

    import torch

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        free = torch.cuda.mem_get_info()[0]
        if last is not None and abs(free - last) < 2**24:
            return
        last = free
        time.sleep(2.0)


@pytest.fixture(scope="module")
def engine(tiny_model, adapters, loop):
    from bt_ray.inference.vllm_compat import VLLMEngine

    wait_for_steady_gpu_memory()
    config = InferenceConfig(engine="vllm", max_batch_size=32, vllm=VLLMConfig(
        max_lora_rank=8, max_loras=2, gpu_memory_utilization=0.3, max_model_len=512, enforce_eager=True))
    engine = VLLMEngine(tiny_model, config)
    yield engine
    engine.shutdown()


def adapted(text: str) -> bool:
    """Starts with a trained adapter's answer (w7 w7 w7 or w9 w9 w9)."""
    return text.split()[:3] in (["w7"] * 3, ["w9"] * 3)


def ask(loop, engine, adapter=None):
    return loop.run_until_complete(engine.generate(GenerationRequest(PROMPT, GREEDY, adapter))).text


def test_trained_adapter_changes_outputs_from_the_next_request(loop, engine, adapters):
    base = ask(loop, engine)
    loop.run_until_complete(engine.load_adapter("run-v1", adapters[7]))
    tuned = ask(loop, engine, "run-v1")  # the very first request after the load returned
    assert tuned.split()[:3] == ["w7", "w7", "w7"], (base, tuned)
    assert not adapted(base), base
    assert ask(loop, engine) == base  # the base model is still served, unchanged (same request, same batch)


def test_two_versions_side_by_side_give_their_own_answers(loop, engine, adapters):
    ask(loop, engine, "run-v1")  # v1's prompt is now in vLLM's prefix cache

    async def load_while_serving():  # the base model (and v1) keep answering while v2 loads
        return await asyncio.gather(engine.load_adapter("run-v2", adapters[9]),
                                    *(engine.generate(GenerationRequest(PROMPT, GREEDY, a)) for a in (None, "run-v1")))

    _, during_base, during_v1 = loop.run_until_complete(load_while_serving())
    assert during_v1.text.split()[:3] == ["w7"] * 3
    assert not adapted(during_base.text), during_base.text  # (random weights: batched greedy may differ in ties)

    async def together():
        return await asyncio.gather(*(engine.generate(GenerationRequest(PROMPT, GREEDY, a))
                                      for a in ("run-v1", "run-v2", None, "run-v2", "run-v1")))

    v1, v2, base_now, v2_again, v1_again = [r.text for r in loop.run_until_complete(together())]
    assert v1.split()[:3] == ["w7"] * 3 and v2.split()[:3] == ["w9"] * 3, (v1, v2)
    assert (v1_again, v2_again) == (v1, v2) and not adapted(base_now), base_now
    health = loop.run_until_complete(engine.health())
    assert health["lora_ids"] == {"run-v1": 1, "run-v2": 2}


def test_a_version_name_is_never_reused(loop, engine, adapters):
    with pytest.raises(AdapterError, match="already used"):
        loop.run_until_complete(engine.load_adapter("run-v1", adapters[9]))  # would serve v1's stale cache
    assert ask(loop, engine, "run-v1").split()[:3] == ["w7"] * 3


def test_sleep_frees_gpu_memory_and_wake_serves_the_same_answers(loop, engine):
    import torch

    before = ask(loop, engine, "run-v2"), ask(loop, engine)
    free_awake = torch.cuda.mem_get_info()[0]
    loop.run_until_complete(engine.sleep())
    free_asleep = torch.cuda.mem_get_info()[0]
    loop.run_until_complete(engine.wake())
    assert free_asleep > free_awake + 2**30, (free_awake, free_asleep)  # KV cache and weights released
    assert (ask(loop, engine, "run-v2"), ask(loop, engine)) == before
