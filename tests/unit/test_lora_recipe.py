"""The worker's recipe (LoraRecipe) in this process on the tiny random Llama, with Ray Train's worker
context replaced by a fake (labelled below): what it reports to Ray Train, and when."""

import pytest

from bt_ray.config import TrainConfig
from tests.tiny import examples


class FakeTrainContext:
    """Fake: one worker, rank 0 of 1 (what ray.train.get_context() gives a lone worker)."""

    def get_world_rank(self):
        return 0

    def get_world_size(self):
        return 1

    def get_local_world_size(self):
        return 1


@pytest.fixture
def reports(monkeypatch):
    """Every ray.train.report call as (metrics, files in its checkpoint or None)."""
    import os

    import ray.train
    import ray.train.torch
    import torch

    calls = []

    def report(metrics, checkpoint=None):
        calls.append((dict(metrics), sorted(os.listdir(checkpoint.path)) if checkpoint else None))

    monkeypatch.setattr(ray.train, "get_context", lambda: FakeTrainContext())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
    return calls


def test_a_worker_reports_once_per_epoch_with_its_checkpoint(tiny_model, reports):
    """Ray Train's worker queue holds one report until the controller polls it (every 2 s): a report
    per optimizer step held each step for up to 2 s (1.84 s/step measured for a 13 ms step)."""
    from transformers import AutoTokenizer

    from bt_ray.train.data import pad_id_of, tokenize
    from bt_ray.train.trainer import LoraRecipe, _loop_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = TrainConfig(use_gpu=False, epochs=2, batch_size=2, micro_batch_size=1, max_seq_len=64, bf16=False,
                         torch_threads=1)
    data = tokenize(tokenizer, examples(7), config.max_seq_len)
    recipe = LoraRecipe(_loop_config(data.examples, config, tiny_model, seed=0, pad_id=pad_id_of(tokenizer)))
    recipe.setup()
    recipe.train()

    steps = len(recipe.losses)
    assert steps == 2 * 8  # 16 examples, 2 per step, 2 epochs
    assert [metrics["step"] for metrics, _ in reports] == [8, 16]
    assert all(files and "adapter_model.safetensors" in files and "train_state.json" in files
               for _, files in reports)
