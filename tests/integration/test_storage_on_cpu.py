"""A plain output_dir on a real 2-node Ray cluster: shared -> passes; node-local -> ConfigError naming the node.

Two Ray nodes are started on this machine with `ray start` (loopback, token authentication ON with a random
token in the environment, as the cluster files do). Where this machine lets us (root, `unshare -m`), the second
node runs in its own mount namespace with a tmpfs over one directory: that directory is REALLY node-local (the
driver and the head see their files, the second node an empty tmpfs at the same path). Everything else both
nodes share, so a directory there must pass through real tasks pinned to each node. A third case is SIMULATED
on any machine: a hook deletes or rewrites the driver's marker file between writing it and asking the nodes.

The nodes and the driver are subprocesses: this process may hold the session `ray_cluster` fixture's Ray (a
process joins one cluster), and `ray stop` would stop every Ray on the machine, so each node is stopped by
killing its own process group.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DRIVER = r"""
import json, sys, time
from pathlib import Path
import ray
from bt_ray import storage
from bt_ray.errors import ConfigError
from bt_ray.inference import placement

shared, local = sys.argv[1], sys.argv[2]
ray.init(log_to_driver=False)  # RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN from the environment
deadline = time.time() + 120
while len(placement.alive_nodes()) < 2 and time.time() < deadline:
    time.sleep(1)
nodes = placement.alive_nodes()
out = {"nodes": [n["NodeID"] for n in nodes],
       "head": next(n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"])}

def check(path, hook=None):
    try:
        storage.check_shared(path, nodes, placement.marker_visible, after_write=hook)
        return "passed"
    except ConfigError as exc:
        return str(exc)

out["shared"] = check(shared)
out["deleted"] = check(shared, lambda m: m.unlink())
out["other_file"] = check(shared, lambda m: m.write_text("another disk"))
if local != "-":
    out["node_local"] = check(local)
out["left_behind"] = sorted(p.name for p in Path(shared).iterdir())
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_unshare(path: Path) -> bool:
    """Can this process give a child its own mount namespace with a tmpfs over `path`? (root, unshare, mount)"""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs '{path}' && test ! -e '{path}/probe'"], capture_output=True)
    return probe.returncode == 0


def _node(args: list[str], env: dict, log: Path, local: Path | None = None) -> subprocess.Popen:
    command = [shutil.which("ray") or "ray", "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
               "--disable-usage-stats", "--block"]
    if local is not None:  # its own mount namespace: an empty tmpfs at `local` that no other node sees
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs tmpfs '{local}' && exec \"$0\" \"$@\"", *command]
    return subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Kill one node's process group (`ray start --block` ignores SIGTERM for tens of seconds here); its
    raylet's workers, in groups of their own, exit when the raylet is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=30)


def test_output_dir_is_checked_on_every_node_of_a_two_node_cluster(tmp_path):
    shared, local = tmp_path / "runs", tmp_path / "node-local"
    shared.mkdir()
    local.mkdir()
    (local / "probe").write_text("on the host")
    real_local = _can_unshare(local)
    temp = Path(tempfile.mkdtemp(prefix="bt-storage-", dir="/tmp"))  # short: Ray's socket paths must fit
    address = f"127.0.0.1:{_free_port()}"
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_ADDRESS": address,
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    head = _node(["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false", f"--temp-dir={temp}"],
                 env, tmp_path / "head.log")
    nodes = [head]
    try:
        time.sleep(5)
        nodes.append(_node([f"--address={address}"], env, tmp_path / "worker.log", local if real_local else None))
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(shared), str(local) if real_local else "-"],
                              capture_output=True, text=True, env=env, timeout=240)
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}\n{logs}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert len(out["nodes"]) == 2
    assert out["shared"] == "passed"  # both nodes read the driver's marker through a task pinned to each
    for case in ("deleted", "other_file"):  # simulated: no node sees the driver's file
        assert f"output_dir={str(shared)!r}" in out[case] and "2 of 2 alive nodes cannot see" in out[case]
        assert all(node[:12] in out[case] for node in out["nodes"]) and "shared filesystem" in out[case]
    assert out["left_behind"] == []  # markers are removed
    if real_local:  # a real node-local directory: only the second node (in its own mount namespace) is named
        other = next(node for node in out["nodes"] if node != out["head"])
        assert f"output_dir={str(local)!r}" in out["node_local"] and "1 of 2 alive nodes" in out["node_local"]
        assert other[:12] in out["node_local"] and out["head"][:12] not in out["node_local"]


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
