"""bt_ray.train.trainer without Ray or a model: refusals, adapter verification, the loss."""

import pytest

from bt_ray.config import TrainConfig
from bt_ray.errors import TrainingError
from bt_ray.train.trainer import startup_retries, token_loss_sum, train_lora, verify_adapter


def test_empty_examples_are_refused_with_the_fix():
    with pytest.raises(TrainingError, match="no traces passed the metric.*train.metric_threshold.*'p' first"):
        train_lora([], TrainConfig(), "unused", "unused", "v1")


def save_adapter(path, b_value=0.5, empty=False):
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    a = torch.zeros(0, 4) if empty else torch.ones(2, 4)
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": a,
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.full((4, 2), b_value)}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_verify_adapter_accepts_a_trained_adapter(tmp_path):
    verify_adapter(save_adapter(tmp_path / "ok"))


@pytest.mark.parametrize("kwargs, message", [({"b_value": 0.0}, "1 of 1 lora_B still all zero"),
                                             ({"empty": True}, "1 empty")])
def test_verify_adapter_refuses_unchanged_or_empty_adapters(tmp_path, kwargs, message):
    with pytest.raises(TrainingError, match=message) as info:
        verify_adapter(save_adapter(tmp_path / "bad", **kwargs))
    assert "ZeRO-3" in str(info.value)


def test_verify_adapter_refuses_a_missing_file(tmp_path):
    with pytest.raises(TrainingError, match="no adapter weights"):
        verify_adapter(tmp_path)


def test_token_loss_counts_only_labelled_next_tokens():
    import torch

    logits = torch.zeros(1, 4, 3)  # uniform over 3 tokens: every labelled position costs ln 3
    labels = torch.tensor([[-100, -100, 2, 1]])  # positions 2 and 3 are predicted from 1 and 2
    assert token_loss_sum(logits, labels).item() == pytest.approx(2 * torch.log(torch.tensor(3.0)).item())


def test_verify_adapter_refuses_tensors_equal_to_their_initial_values(tmp_path):
    from safetensors.torch import load_file

    from bt_ray.train.trainer import tensor_digest

    trained = save_adapter(tmp_path / "trained", b_value=0.5)
    start = {k: tensor_digest(v) for k, v in load_file(str(trained / "adapter_model.safetensors")).items()}
    # Θ after Θ starts from a non-zero B: an adapter saved unchanged must still be refused
    with pytest.raises(TrainingError, match="2 equal to their initial values"):
        verify_adapter(trained, start)
    changed = dict(start, **{k: "0" * 16 for k in start if "lora_B" in k})  # B moved, A did not: fine
    verify_adapter(trained, changed)
    with pytest.raises(TrainingError, match="1 missing"):
        verify_adapter(trained, dict(changed, **{"base_model.model.layers.1.q_proj.lora_A.weight": "x"}))


def test_tensor_digest_ignores_the_saved_dtype_but_not_the_values():
    import torch

    from bt_ray.train.trainer import tensor_digest

    weights = torch.randn(4, 8)
    assert tensor_digest(weights) == tensor_digest(weights.to(torch.bfloat16))
    assert tensor_digest(weights) != tensor_digest(weights + 0.05)


@pytest.mark.parametrize("mode, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_config_keeps_bt_rays_accumulation_and_batch(mode, stage):
    from bt_ray.train.deepspeed_config import deepspeed_config

    config = deepspeed_config(mode, micro_batch_size=2, world_size=4, bf16=True)
    assert config["zero_optimization"]["stage"] == stage
    assert config["gradient_accumulation_steps"] == 1  # the recipe marks the boundary itself
    assert config["train_batch_size"] == 8 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["bf16"] == {"enabled": True} and config["zero_allow_untested_optimizer"]
    with pytest.raises(ValueError, match="not a DeepSpeed mode"):
        deepspeed_config("ddp", 1, 1, True)


def test_ray_trains_start_retries_cover_placement_timeout(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert startup_retries(300.0) == 5  # 60 s per attempt, Ray Train's default
    assert startup_retries(2.0) == 1
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    assert startup_retries(300.0) == 10


def test_epoch_checkpoints_survive_a_resume_that_changes_only_execution_keys():
    from bt_ray.train.trainer import _loop_config

    base = TrainConfig(max_failures=0, cpus_per_worker=1.0)
    fingerprint = lambda config: _loop_config([], config, "/m", seed=0, pad_id=0)["fingerprint"]  # noqa: E731
    # A worker failed: rerun with more retries and CPUs; the finished epochs are reused.
    assert fingerprint(TrainConfig(max_failures=2, cpus_per_worker=2.0, torch_threads=1)) == fingerprint(base)
    assert fingerprint(TrainConfig(max_failures=0, cpus_per_worker=1.0, learning_rate=3e-4)) != fingerprint(base)
