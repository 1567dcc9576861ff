"""A tiny Π→Θ→Π on one GPU: vLLM replica, Ray Train LoRA on the same GPU (placement timeshare: the
replica sleeps during Θ), the shipped SmolLM2-135M, Iris with small budgets."""

import pytest

from bt_ray.config import load_config
from bt_ray.driver import Driver

pytestmark = pytest.mark.gpu

ONE_GPU = ["placement.mode=timeshare", "inference.engine=vllm", "inference.gpus_per_replica=1",
           "inference.max_batch_size=128", "inference.vllm.gpu_memory_utilization=0.3",
           "inference.vllm.enforce_eager=true", "inference.vllm.max_model_len=4096", "train.use_gpu=true",
           "train.epochs=2", "prompt.train_size=10", "prompt.val_size=15", "prompt.num_candidates=3",
           "task.dev_size=20", "task.test_size=20"]


def test_tiny_p_w_p_on_one_gpu(model_dir, ray_gpu, tmp_path):
    config = load_config("configs/quickstart.yaml", ONE_GPU + [f"output_dir={tmp_path}", "name=gpu-tiny",
                                                               f"model.name={model_dir}"])
    results = Driver(config).run()
    steps = results["steps"]
    assert [s["strategy"] for s in steps] == ["vanilla", "Π", "Π→Θ", "Π→Θ→Π"]
    assert steps[2]["version"] == steps[3]["version"] == "gpu-tiny-v1"
    assert set(steps[3]["requests_by_version"]) == {"gpu-tiny-v1"}  # Π after Θ ran on the adapter
    train = steps[2]["details"]["train"]
    assert train["steps"] > 0 and train["workers"] == 1
    assert results["test"]["n"] == 20 and results["test"]["step"] == 3
