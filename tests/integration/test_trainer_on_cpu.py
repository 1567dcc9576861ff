"""train_lora on a real local Ray cluster (2 CPUs) with the real SmolLM2-135M: ~2 minutes.

Each fit is small (8 short examples, 1 step per epoch, lr 1e-4); most of the time is Ray
starting workers and loading the model.
"""

import json
import math
import time
from pathlib import Path

import pytest

from bt_ray.config import TrainConfig
from bt_ray.errors import ResourceError, TrainingError
from bt_ray.train.trainer import CRASH_ONCE_ENV, STATE_FILE, train_lora

pytestmark = pytest.mark.integration

SPECIES = ["setosa", "versicolor", "virginica"]


def examples(n=8):
    return [[{"role": "system", "content": "Classify the iris flower from its petal measurements."},
             {"role": "user", "content": f"petal length {1.0 + 0.7 * i:.1f} cm, petal width {0.2 + 0.3 * i:.1f} cm"},
             {"role": "assistant", "content": f"[[ ## answer ## ]]\n{SPECIES[i % 3]}\n\n[[ ## completed ## ]]"}]
            for i in range(n)]


def small_config(**overrides):
    # fp32: the 1- vs 2-worker comparison below is at rel 1e-4, inside bf16's rounding (a CI run gave 4.8396 vs
    # 4.8376 in bf16); bf16 training on CPU runs in the pipeline tests
    base = dict(num_workers=1, epochs=1, learning_rate=1e-4, max_seq_len=256, bf16=False)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def one_worker(ray_cluster, model_dir, tmp_path_factory):
    return train_lora(examples(), small_config(), model_dir, str(tmp_path_factory.mktemp("w1")), "w1")


@pytest.fixture(scope="module")
def two_workers(ray_cluster, model_dir, tmp_path_factory):
    return train_lora(examples(), small_config(num_workers=2), model_dir,
                      str(tmp_path_factory.mktemp("w2")), "w2")


def lora_b(adapter_dir):
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return {k: v.float() for k, v in tensors.items() if "lora_B" in k}


@pytest.mark.parametrize("result_name", ["one_worker", "two_workers"])
def test_training_produces_a_verified_adapter(result_name, request):
    result = request.getfixturevalue(result_name)
    assert result.steps == 1 and len(result.losses) == 1
    assert all(math.isfinite(x) and x > 0 for x in result.losses)
    assert result.examples == 8 and result.dropped == 0
    assert 0 < result.trained_tokens < result.total_tokens
    assert Path(result.adapter_dir).name == "adapter"
    b = lora_b(result.adapter_dir)
    assert len(b) == 2 * 30  # q_proj and k_proj in each of SmolLM2-135M's 30 layers
    assert all(t.abs().sum() > 0 for t in b.values())


def test_two_workers_train_the_same_global_batch_as_one(one_worker, two_workers):
    """DDP sums both halves of the batch: same first-step loss, (nearly) the same update as 1 worker."""
    import torch

    assert two_workers.losses[0] == pytest.approx(one_worker.losses[0], rel=1e-4)
    b1, b2 = lora_b(one_worker.adapter_dir), lora_b(two_workers.adapter_dir)
    flat1 = torch.cat([b1[k].flatten() for k in sorted(b1)])
    flat2 = torch.cat([b2[k].flatten() for k in sorted(b2)])
    # Adam's first step is ~lr * sign(grad): only near-zero gradients may flip with summation order
    assert torch.nn.functional.cosine_similarity(flat1, flat2, dim=0) > 0.99


def test_adapter_loads_with_peft_and_changes_the_logits(one_worker, model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bt_ray.inference import chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, one_worker.adapter_dir).eval()
    ids = torch.tensor([chat.prompt_ids(tokenizer, examples()[0][:-1])])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert torch.isfinite(tuned).all()
    assert (tuned - plain).abs().max() > 1e-4


def test_a_crashed_worker_is_retried_and_resumes_from_the_last_epoch(ray_cluster, model_dir, tmp_path, monkeypatch):
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    result = train_lora(examples(), small_config(epochs=2, max_failures=1), model_dir, str(tmp_path), "retry")
    assert marker.exists()  # the first attempt did crash after epoch 1
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    (state_file,) = (tmp_path / "retry").glob(f"checkpoint_*/{STATE_FILE}")
    assert json.loads(state_file.read_text())["starts"] == [0, 1]  # second attempt started at epoch 1


def test_a_worker_failure_without_retries_raises_training_error(ray_cluster, model_dir, tmp_path):
    with pytest.raises(TrainingError, match="failed") as info:
        train_lora(examples(), small_config(target_modules=["no_such_proj"]), model_dir, str(tmp_path), "bad")
    assert info.value.__cause__ is not None


def test_workers_the_cluster_cannot_place_fail_in_time_naming_what_was_asked(ray_cluster, model_dir, tmp_path):
    from bt_ray.inference import placement

    held = hold_free_cpus(ray_cluster)
    try:
        started = time.monotonic()
        with pytest.raises(ResourceError) as err:
            train_lora(examples(), small_config(), model_dir, str(tmp_path), "crowded", placement_timeout_s=2.0)
        assert time.monotonic() - started < 60  # it did not wait for the CPUs forever
    finally:
        placement.release(held)
    message = str(err.value)
    assert "1 LoRA training worker(s) for 'crowded'" in message and "placement.timeout_s=2s" in message
    assert "1 x {1 CPU}" in message and "0 CPU free" in message and "train.num_workers" in message


def test_workers_taken_between_the_check_and_ray_trains_start_fail_naming_what_was_asked(
        ray_cluster, model_dir, tmp_path, monkeypatch):
    """The race the check cannot close: it finds room and gives it back, another job takes it, and Ray Train's
    own worker group then waits. Ray Train gives up after its start attempts (as many as fit in
    placement.timeout_s) and that ends as a ResourceError too, not as Ray Train's generic controller error."""
    from bt_ray.inference import placement
    from bt_ray.train import trainer

    monkeypatch.setattr(trainer, "_check_placeable", lambda *args: None)  # room at the check, gone at fit()
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "2")  # one 2 s start attempt
    held = hold_free_cpus(ray_cluster)
    try:
        with pytest.raises(ResourceError) as err:
            train_lora(examples(), small_config(), model_dir, str(tmp_path), "raced", placement_timeout_s=2.0)
    finally:
        placement.release(held)
    message = str(err.value)
    assert message.startswith("Ray Train could not start 1 LoRA training worker(s) for 'raced' within "
                              "placement.timeout_s=2s")
    assert "1 x {1 CPU}" in message and "0 CPU free" in message and "train.num_workers" in message
    assert type(err.value.__cause__).__name__ == "ControllerError"


def hold_free_cpus(ray_cluster):
    """Another job holds every free CPU (a placement group). Released resources (an earlier test's) come
    back to available_resources a moment later: wait for them."""
    from bt_ray.inference import placement

    deadline = time.monotonic() + 30
    while not ray_cluster.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.2)
    return placement.reserve([{"CPU": ray_cluster.available_resources()["CPU"]}], "someone-else", 30.0,
                             "the other job")
