"""A plain output_dir on a real 2-node Ray cluster: shared -> passes; not seen by the nodes -> ConfigError.

The two nodes (ray.cluster_utils.Cluster) run on this one machine, so they really share its filesystem
and the first check must pass through real Ray tasks pinned to each node. A directory that the nodes
cannot see is SIMULATED: a test hook deletes (or rewrites) the driver's marker file between writing it
and asking the nodes, which is what a node with its own local disk at that path observes.

The cluster runs in a subprocess: this process may already hold the session `ray_cluster` fixture's
Ray, and a process can be connected to only one cluster.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = r"""
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from bt_ray import storage
from bt_ray.errors import ConfigError
from bt_ray.inference import placement

shared = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
out = {}
try:
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    nodes = placement.alive_nodes()
    out["nodes"] = [n["NodeID"][:12] for n in nodes]
    storage.check_shared(shared, nodes, placement.marker_visible)
    out["shared"] = "passed"
    for name, hook in {"deleted": lambda m: m.unlink(), "other_file": lambda m: m.write_text("another disk")}.items():
        try:
            storage.check_shared(shared, nodes, placement.marker_visible, after_write=hook)
            out[name] = "passed"
        except ConfigError as exc:
            out[name] = str(exc)
    out["left_behind"] = [p.name for p in Path(shared).iterdir()]
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_output_dir_is_checked_on_every_node_of_a_two_node_cluster(tmp_path):
    shared = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(shared)], capture_output=True, text=True, env=env,
                          timeout=180)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert len(out["nodes"]) == 2
    assert out["shared"] == "passed"  # both nodes read the driver's marker through a task pinned to each
    for case in ("deleted", "other_file"):
        assert f"output_dir={str(shared)!r}" in out[case] and "2 of 2 alive nodes cannot see" in out[case]
        assert all(node in out[case] for node in out["nodes"]) and "shared filesystem" in out[case]
    assert out["left_behind"] == []  # markers are removed


def test_lora_checkpoints_and_adapters_travel_through_a_storage_uri(ray_cluster, model_dir, tmp_path, monkeypatch):
    """output_dir=file://...: the same pyarrow.fs path as s3:// or gs://. Ray Train writes its checkpoint to the
    URI, the adapter goes up with the run, a replica loads it from the URI, and a second Θ (as on another node)
    starts from the URI."""
    import asyncio
    import shutil

    from bt_ray import storage
    from bt_ray.config import InferenceConfig, load_config
    from bt_ray.inference.replica import ReplicaActor
    from bt_ray.state import RunState
    from bt_ray.train.trainer import train_lora

    from .test_trainer_on_cpu import examples, small_config

    monkeypatch.setattr(storage, "RUN_CACHE", str(tmp_path / "run-cache"))
    monkeypatch.setattr(storage, "ADAPTER_CACHE", str(tmp_path / "adapter-cache"))
    monkeypatch.setattr(storage, "_mirrors", {})
    remote = tmp_path / "bucket"
    config = load_config(None, [f"output_dir=file://{remote}", "name=uri-run"])
    state = RunState.open(config.run_dir, config, resume=False)

    first = train_lora(examples(), small_config(), model_dir, str(state.step_dir(1, "w")), "uri-run-v1")
    assert Path(first.adapter_dir).is_relative_to(config.run_dir)  # published into the working copy
    assert list((remote / "uri-run" / "steps" / "01-w" / "uri-run-v1").glob("checkpoint_*"))  # Ray Train -> URI
    assert not list((state.step_dir(1, "w") / "uri-run-v1").glob("checkpoint_*"))
    uri = storage.shared_path(first.adapter_dir)
    assert uri == f"file://{remote}/uri-run/steps/01-w/uri-run-v1/adapter"

    replica = ReplicaActor("replica-0", "transformers", model_dir, InferenceConfig(), "auto")
    asyncio.run(replica.load_adapter("uri-run-v1", uri))  # downloads to this node's cache, then peft loads it
    assert asyncio.run(replica.health())["adapters"] == ["uri-run-v1"]

    worker_cache = Path("~/.cache/bt-ray/adapters").expanduser()  # the worker's own process: the default cache
    fetched = []
    try:  # Θ -> Θ: the training worker gets the URI and downloads it before loading
        second = train_lora(examples(), small_config(), model_dir, str(state.step_dir(2, "w")), "uri-run-v2",
                            init_adapter_dir=uri)
        fetched = [d for d in worker_cache.glob("*/.complete") if d.read_text() == uri]
        assert second.steps == 1 and len(fetched) == 1
        assert (fetched[0].parent / "adapter_model.safetensors").is_file()
    finally:
        for marker in fetched:
            shutil.rmtree(marker.parent, ignore_errors=True)
