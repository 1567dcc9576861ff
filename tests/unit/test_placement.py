"""Placement modes without Ray: what each mode reserves, and configs that cannot work."""

import pytest

from bt_ray.config import load_config
from bt_ray.errors import ConfigError
from bt_ray.inference.placement import (TIMESHARE_REPLICA_GPU, TIMESHARE_TRAIN_GPU, check_resources, replica_bundles,
                                        replica_options, train_gpus_per_worker)

SPLIT = ["placement.mode=split", "train.use_gpu=true", "inference.gpus_per_replica=1"]
TIMESHARE = ["placement.mode=timeshare", "train.use_gpu=true", "inference.gpus_per_replica=1"]


def test_cpu_mode_reserves_cpus_only():
    config = load_config(None, ["inference.replicas=2", "inference.cpus_per_replica=0.5"])
    assert replica_bundles(config) == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert train_gpus_per_worker(config) == 0.0
    assert replica_options(config, "run", 1)["num_gpus"] == 0.0


def test_split_gives_replicas_and_trainers_their_own_gpus():
    config = load_config(None, SPLIT + ["inference.replicas=2", "train.num_workers=2", "train.batch_size=8"])
    assert replica_bundles(config) == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert train_gpus_per_worker(config) == 1.0
    check_resources(config, {"CPU": 8.0, "GPU": 4.0})
    with pytest.raises(ConfigError, match="needs 4 GPUs.*has 3.*timeshare"):
        check_resources(config, {"CPU": 8.0, "GPU": 3.0})


def test_timeshare_shares_each_gpu_between_one_replica_and_one_trainer():
    config = load_config(None, TIMESHARE + ["inference.replicas=2", "train.num_workers=2"])
    assert TIMESHARE_REPLICA_GPU + TIMESHARE_TRAIN_GPU <= 1.0 < 2 * TIMESHARE_REPLICA_GPU  # never 2 replicas/GPU
    assert 2 * TIMESHARE_TRAIN_GPU > 1 - TIMESHARE_REPLICA_GPU  # never 2 trainers beside one replica
    assert replica_bundles(config) == [{"CPU": 1.0, "GPU": TIMESHARE_REPLICA_GPU}] * 2
    assert replica_options(config, "run", 0)["num_gpus"] == TIMESHARE_REPLICA_GPU
    assert train_gpus_per_worker(config) == TIMESHARE_TRAIN_GPU
    check_resources(config, {"CPU": 8.0, "GPU": 2.0})  # 2 GPUs serve 2 replicas and 2 trainers
    too_many = load_config(None, TIMESHARE + ["train.num_workers=2"])
    with pytest.raises(ConfigError, match="train.num_workers: placement.mode=timeshare.*at most"):
        check_resources(too_many, {"CPU": 8.0, "GPU": 2.0})


@pytest.mark.parametrize("overrides, message", [
    (["inference.gpus_per_replica=1"], "placement.mode: 'cpu' uses no GPUs"),
    (["inference.engine=vllm", "inference.gpus_per_replica=1"], "placement.mode: 'cpu' uses no GPUs"),
    (["placement.mode=split", "inference.gpus_per_replica=1"], "train.use_gpu: placement.mode=split trains on GPUs"),
    (["placement.mode=split", "train.use_gpu=true"], "inference.gpus_per_replica: placement.mode=split"),
    (TIMESHARE + ["inference.gpus_per_replica=2"], "inference.gpus_per_replica: placement.mode=timeshare"),
    (TIMESHARE + ["inference.engine=vllm", "inference.vllm.sleep_level=0"], "inference.vllm.sleep_level"),
    (["inference.engine=vllm", "inference.vllm.sleep_level=2"], "vLLM issue #39934"),
    (["train.distributed=zero3"], "train.distributed: zero3 .DeepSpeed. is for GPU training"),
    (["placement.mode=everywhere"], "placement.mode: 'everywhere' is not one of"),
    (["placement.timeout_s=0"], "placement.timeout_s: must be a number > 0"),
])
def test_placement_problems_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_replica_must_reserve_something():
    with pytest.raises(ConfigError, match="inference.cpus_per_replica: a replica must reserve"):
        replica_bundles(load_config(None, ["inference.cpus_per_replica=0"]))
