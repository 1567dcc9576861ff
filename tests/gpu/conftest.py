"""GPU fixtures (marker `gpu`; tests/conftest.py skips these tests without CUDA, so nothing here runs on CPU CI)."""

import asyncio
import sys

import pytest

from bt_ray.synthetic import words

# A small random-weight Llama: vLLM starts it in seconds; LoRA learns a fixed answer in a few steps.
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048}


def examples(answer_word: int) -> list[list[dict]]:
    """16 prompts (the test prompt among them), all answered with the same four words."""
    prompts = [words([100, 101, 102])] + [words([i, i + 1, i + 2]) for i in range(20, 35)]
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": words([answer_word] * 4)}]
            for p in prompts]


def pytest_runtest_logreport(report):
    """Print a failure as it happens: a later hang, or the node's time running out, must not lose it
    (pytest prints its failure reports only at the end of the session)."""
    if report.failed:
        print(f"\n--- FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n---", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from bt_ray.synthetic import random_model

    return str(random_model(tmp_path_factory.mktemp("tiny-llama"), TINY, vocab_size=512))


@pytest.fixture(scope="session")
def ray_gpu():
    """A local Ray cluster with this node's GPUs (training workers run there)."""
    import ray

    from bt_ray.inference.placement import connect

    owner = connect(None)
    yield ray
    if owner:
        ray.shutdown()


@pytest.fixture(scope="module")
def loop():
    """One event loop per module: vLLM's AsyncLLM keeps its output task on the loop it first ran on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
