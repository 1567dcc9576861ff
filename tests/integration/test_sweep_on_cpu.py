"""bt-ray sweep and `ray job submit` on CPU: the shipped model, real Ray, real DSPy, tiny sizes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from bt_ray.scheduler import SweepRun
from bt_ray.sweep import load_sweep

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "task.train_size": 12, "task.dev_size": 4, "task.test_size": 4,
    "prompt.train_size": 4, "prompt.val_size": 4, "prompt.num_candidates": 3,
    "inference.max_tokens": 48,  # plumbing, not scores: most answers are cut short and score 0
    # Half a CPU each for the replica and the (unused) trainer: two cells at once on the 2-CPU cluster.
    "inference.cpus_per_replica": 0.5, "train.cpus_per_worker": 0.5, "inference.torch_threads": 1,
}


def test_two_strategies_sharing_a_prefix_compute_it_once_per_seed(ray_cluster, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "share", "output_dir": str(tmp_path / "runs"), "overrides": TINY,
        "tasks": {"iris": {"config": str(REPO / "configs" / "iris.yaml")}},
        "models": {"smol": "smollm2-135m"}, "strategies": ["p", "p -> p"], "seeds": [0, 1]}))
    sweep = load_sweep(path)
    lines = []
    assert SweepRun(sweep, echo=lines.append).run() == 0, lines

    for seed in (0, 1):
        parent, child = sweep.cell(f"iris-smol-p-s{seed}"), sweep.cell(f"iris-smol-p_p-s{seed}")
        first = json.loads((parent.run_dir / "results.json").read_text())
        second = json.loads((child.run_dir / "results.json").read_text())
        assert first["test"] is not None and second["test"] is not None
        assert [s["reused_from"] for s in first["steps"]] == [None, None]
        assert [s["reused_from"] for s in second["steps"]] == [parent.name, parent.name, None]
        assert [s["dev"] for s in second["steps"][:2]] == [s["dev"] for s in first["steps"]]
        starts = lambda cell: [e["step"] for e in map(json.loads, (cell.run_dir / "events.jsonl").open())  # noqa
                               if e["event"] == "start"]
        assert starts(parent) == [1] and starts(child) == [2]  # the shared Π ran once, in the parent
        # The child's step 2 started from the parent's Π program, copied into the child's run dir.
        copied = Path(json.loads((child.run_dir / "state.json").read_text())["steps"][1]["program_path"])
        assert copied.is_relative_to(child.run_dir) and copied.read_text() == \
            (parent.run_dir / copied.relative_to(child.run_dir)).read_text()
    status = json.loads((sweep.dir / "sweep.json").read_text())["cells"]
    assert {c["name"]: c["status"] for c in status} == {c.name: "done" for c in sweep.cells}
    assert [r["step"] for r in next(c for c in status if c["name"] == "iris-smol-p_p-s1")["reused"]] == [0, 1]
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 4 and all("done" in line and "test " in line for line in progress)

    # Rerunning the sweep skips the finished cells: nothing is started again.
    again = []
    assert SweepRun(load_sweep(path), echo=again.append).run() == 0
    progress = [line for line in again if line.startswith("[")]
    assert len(progress) == 4 and all("finished earlier" in line for line in progress)
    rerun = {c["name"]: c for c in json.loads((sweep.dir / "sweep.json").read_text())["cells"]}
    assert all(rerun[c["name"]]["wall_s"] == c["wall_s"] > 0 for c in status)  # the first run's times are kept
    assert all(len([e for e in map(json.loads, (c.run_dir / "events.jsonl").open()) if e["event"] == "test"]) == 1
               for c in sweep.cells)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_bt_ray_on_a_local_head(tmp_path):
    """`ray start --head` on loopback, `ray job submit --working-dir <repo> -- python -m bt_ray.cli run ...`.

    Token authentication is turned off (RAY_AUTH_MODE=disabled) in this test's commands only: the head
    listens on 127.0.0.1 and lives for this test. It is stopped by ending the `ray start --block` process
    we started (and its process group), not with `ray stop`, which would stop every Ray on the machine,
    the integration tests' own cluster included.
    """
    port, dashboard, agent, agent_grpc, metrics, runtime_env_agent = (_free_port() for _ in range(6))
    temp_dir = tempfile.mkdtemp(prefix="btr-")  # short: Ray's socket paths must stay under 108 characters
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--num-gpus=0",
         # Own ports for the node's agents too: the defaults (52365, ...) may belong to another Ray on this machine.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env_agent}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(address, head)
        out = tmp_path / "runs"
        job_id = f"bt-ray-test-{uuid.uuid4().hex[:8]}"
        runtime_env = {"working_dir": str(REPO), "excludes": ["runs/", ".venv/", ".git/", ".whl/", "build/",
                                                               "gpu-check-results/", "*.egg-info/", "__pycache__/"]}
        overrides = [f"{k}={v}" for k, v in TINY.items()] + ["strategy=vanilla", "name=job", f"output_dir={out}"]
        command = ["ray", "job", "submit", "--address", address, "--submission-id", job_id,
                   "--runtime-env-json", json.dumps(runtime_env), "--",
                   "python", "-m", "bt_ray.cli", "run", "configs/iris.yaml", *overrides]
        deadline = time.time() + 90
        while True:  # the job server answers before the node's agent takes jobs: retry until it does
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in submit.stdout + submit.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        results = json.loads((out / "job" / "results.json").read_text())
        assert results["test"]["n"] == TINY["task.test_size"] and [s["step"] for s in results["steps"]] == [0]
        logs = subprocess.run(["ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                              text=True, timeout=60)
        assert logs.returncode == 0 and "joined the Ray cluster" in logs.stdout
        assert f"**Test: {results['test']['score']:.1f}%**" in logs.stdout  # the run's table, in the job's log
        assert "uploading" in (submit.stdout + submit.stderr).lower()  # the working dir went up to the head
    finally:
        head.terminate()  # `ray start --block` stops the head's processes when it ends
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of that head still left (its own process group)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_server(address: str, head: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start --head exited with {head.returncode}: {head.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the Ray head's job server at {address} did not answer within {timeout_s}s")
