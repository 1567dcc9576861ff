"""bt_ray.train.trainer without Ray or a model: refusals, adapter verification, the loss."""

import pytest

from bt_ray.config import TrainConfig
from bt_ray.errors import TrainingError
from bt_ray.train.trainer import token_loss_sum, train_lora, verify_adapter


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
