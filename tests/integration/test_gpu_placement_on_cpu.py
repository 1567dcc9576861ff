"""placement.mode split and timeshare in Ray's real scheduler, on a CPU machine: a separate local Ray cluster
that declares 2 logical GPUs (Ray counts GPUs, it does not touch them), replicas on the fake engine (labelled:
no model), and training workers checked by train_lora's placement check, which fails before any worker starts.
Ray assigns fractional GPUs per GPU, so timeshare's 0.6 / 0.4 shares must put each replica on its own GPU and
at most one trainer beside it; this test holds the scheduler to that."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DRIVER = r"""
import json, sys
import ray
from bt_ray.config import TrainConfig, load_config
from bt_ray.errors import ResourceError
from bt_ray.inference import placement
from bt_ray.inference.pool import InferencePool
from bt_ray.train.trainer import train_lora

tiny_model, out = sys.argv[1], sys.argv[2]
ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)  # its own cluster
chat = [[{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]]
result = {}


def gpu_ids(pool):
    return sorted(ray.get(a.__ray_call__.remote(lambda self: ray.get_gpu_ids())) for a in pool.replicas.values())


def trainers_that_fail(config, workers, gpus):
    train = TrainConfig(use_gpu=True, num_workers=workers, cpus_per_worker=0.5, batch_size=workers, epochs=1)
    try:
        train_lora(chat, train, tiny_model, out, name=f"{config.placement.mode}-{workers}", gpus_per_worker=gpus,
                   placement_timeout_s=3)
    except ResourceError as exc:
        return str(exc)
    return None


for mode, replicas in [("timeshare", 2), ("split", 1)]:
    config = load_config(None, [f"placement.mode={mode}", "train.use_gpu=true", "inference.engine=fake",
                                "inference.gpus_per_replica=1", f"inference.replicas={replicas}",
                                "inference.cpus_per_replica=0.5", "placement.timeout_s=30"])
    pool = InferencePool(config, "unused-model-dir", mode)
    pool.start()
    try:
        gpus = placement.train_gpus_per_worker(config)
        # as many trainers as fit beside the replicas are placed (then given back), one more is not
        fits = replicas if mode == "timeshare" else 2 - replicas
        group = placement.reserve([{"CPU": 0.5, "GPU": gpus}] * fits, f"{mode}-trainers", 30, "trainers")
        placement.release(group)
        result[mode] = {"replica_gpus": gpu_ids(pool), "one_too_many": trainers_that_fail(config, fits + 1, gpus)}
    finally:
        pool.shutdown()
print("RESULT " + json.dumps(result))
"""


def test_split_and_timeshare_place_as_designed_in_rays_scheduler(tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", DRIVER, tiny_model, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    timeshare, split = out["timeshare"], out["split"]
    # timeshare: each replica's 0.6 on its own GPU, a 0.4 trainer beside each, a third trainer has no room
    # although 0.8 GPU is free in total (Ray does not split a 0.4 share across two GPUs)
    assert [len(ids) for ids in timeshare["replica_gpus"]] == [1, 1]
    assert timeshare["replica_gpus"][0] != timeshare["replica_gpus"][1]
    assert "3 x {0.5 CPU, 0.4 GPU} = 1.5 CPU, 1.2 GPU" in timeshare["one_too_many"]
    assert "0.8 GPU free" in timeshare["one_too_many"]
    # split: the replica holds a whole GPU, so one whole-GPU trainer fits and a second does not
    assert [len(ids) for ids in split["replica_gpus"]] == [1]
    assert "2 x {0.5 CPU, 1 GPU} = 1 CPU, 2 GPU" in split["one_too_many"] and "1 GPU free" in split["one_too_many"]
