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
