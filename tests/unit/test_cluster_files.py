"""cluster/: every manifest parses, keeps Ray token auth on, commits no secret, runs our Ray pin and a real
bt-ray subcommand on shared storage; the Slurm script passes `bash -n`. Nothing here talks to a cluster."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from bt_ray.cli import main

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE_REPO_DIR = "/home/ray/bt-ray"  # where cluster/Dockerfile and the launcher put this repository
SHARED = "/mnt/bt-ray"  # the shared volume's mount path in the KubeRay and launcher files


def ray_pin() -> str:
    """The version in pyproject.toml's `"ray[...]==X"` dependency (a regex: tomllib needs Python 3.11)."""
    return re.search(r'^\s*"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def docs(kind: str) -> list[dict]:
    found = [d for p in sorted(CLUSTER.rglob("*.yaml")) for d in load(p) if d.get("kind") == kind]
    assert found, f"no {kind} in cluster/"
    return found


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        pods.append(doc["spec"]["submitterPodTemplate"])
    return pods


def test_every_yaml_parses():
    paths = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.relative_to(CLUSTER).as_posix() for p in paths} >= {
        "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/storage.yaml", "launcher/aws.yaml"}
    for path in paths:
        assert load(path), path


def test_kuberay_token_auth_on_every_container_from_a_secret():
    for doc in docs("RayCluster") + docs("RayJob"):
        assert doc["apiVersion"] == "ray.io/v1"
        for pod in pod_templates(doc):
            for container in pod["spec"]["containers"]:
                env = {e["name"]: e for e in container["env"]}
                where = f"{doc['metadata']['name']}/{container['name']}"
                assert env["RAY_AUTH_MODE"]["value"] == "token", where
                assert "value" not in env["RAY_AUTH_TOKEN"], where
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"], where
                for name, var in env.items():  # anything secret comes from a Secret, never a literal
                    if re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", name):
                        assert "secretKeyRef" in var.get("valueFrom", {}), f"{where}: {name}"


def test_kuberay_gpu_workers_shared_volume_and_image_match_the_pin():
    pin = ray_pin()
    claim = docs("PersistentVolumeClaim")[0]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for doc in docs("RayCluster") + docs("RayJob"):
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert spec["rayVersion"] == pin
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert group["rayStartParams"]["num-gpus"] == str(limits["nvidia.com/gpu"])
        for pod in pod_templates(doc):
            for container in pod["spec"]["containers"]:
                assert f"ray{pin}-py312-gpu" in container["image"], container["image"]
        for pod in pod_templates(doc)[:1 + len(spec["workerGroupSpecs"])]:  # the Ray pods (not the submitter)
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
            pvc = volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"]
            assert pvc == claim["metadata"]["name"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pin)}-py312-gpu$", dockerfile, re.M)
    assert docs("RayJob")[0]["spec"]["rayClusterSpec"] == docs("RayCluster")[0]["spec"]  # one cluster, two files


def check_command(command: str, shared: str) -> None:
    """`bt-ray SUB FILE key=value...`: SUB is a bt-ray subcommand, FILE is in this repo, output_dir is shared."""
    words = shlex.split(command)
    assert words[0] == "bt-ray", command
    try:
        main([words[1], "--help"])
    except SystemExit as exc:
        if exc.code != 0 and words[1] == "sweep":
            pytest.skip("`bt-ray sweep` is not on this branch yet (issue 8's sweep branch adds it)")
        assert exc.code == 0, f"`bt-ray {words[1]}` is not a bt-ray subcommand"
    config = words[2].removeprefix(IMAGE_REPO_DIR + "/")
    assert (REPO / config).is_file(), config
    overrides = dict(w.split("=", 1) for w in words[3:] if "=" in w)
    assert overrides["output_dir"].startswith(shared), command


def test_kuberay_entrypoint_is_a_bt_ray_command_writing_to_the_shared_volume():
    check_command(docs("RayJob")[0]["spec"]["entrypoint"], SHARED)


def test_cluster_launcher_is_valid_and_keeps_auth_on_and_loopback_dashboard():
    import json

    import jsonschema
    import ray.autoscaler

    config = load(CLUSTER / "launcher" / "aws.yaml")[0]
    jsonschema.validate(config, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    pin = ray_pin()
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pin}-py312-gpu")
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start --address" in workers
    token_mount = config["file_mounts"]["/home/ray/.ray/auth_token"]
    assert token_mount.startswith("~/"), "the token is copied from the submitting machine, not written here"
    assert config["file_mounts"][IMAGE_REPO_DIR] == "."
    assert any(f"{IMAGE_REPO_DIR}[gpu]" in c for c in config["setup_commands"])
    gpu = config["available_node_types"]["gpu"]["resources"]["GPU"]
    assert gpu >= 1 and any(SHARED in c for c in config["initialization_commands"])
    command = next(m.group(1) for line in (CLUSTER / "launcher" / "aws.yaml").read_text().splitlines()
                   if (m := re.match(r"#\s+(bt-ray \w+ \S+\.yaml.*)$", line)))  # the `ray job submit` example
    check_command(command, SHARED)


def test_slurm_script():
    script = CLUSTER / "slurm" / "sweep.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "export RAY_AUTH_MODE=token" in text
    assert ': "${RAY_AUTH_TOKEN:?' in text  # required from the environment
    assert not re.search(r"RAY_AUTH_TOKEN=(?!\"\$\()[\"']?\w", text), "a token value is written in the script"
    assert re.search(r"ray start --head .*--dashboard-host=127\.0\.0\.1", text)
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert code.count("--block") == 2 and code.count("srun") >= 3 and "ray stop" in code
    line = next(line for line in text.splitlines() if line.startswith("bt-ray "))
    assert line.startswith('bt-ray sweep "$SWEEP" output_dir="$SHARED/runs"')


def test_no_secret_values_and_auth_never_disabled_outside_loopback_tests():
    secret_like = re.compile(r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|\b[A-Fa-f0-9]{32,}\b|-----BEGIN")
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        assert not secret_like.search(path.read_text()), path
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        if rel.startswith("tests/") or not (REPO / rel).is_file():
            continue
        lines = (REPO / rel).read_text(errors="ignore").splitlines()
        for i, line in enumerate(lines):
            if re.search(r"RAY_AUTH_MODE[=:]\s*[\"']?disabled", line):
                context = " ".join(lines[max(0, i - 2): i + 1]).lower()
                assert "loopback" in context, f"{rel}:{i + 1} turns Ray auth off without saying it is loopback-only"


def test_the_image_and_install_script_use_the_pinned_vllm_and_deepspeed():
    """vLLM and DeepSpeed are installed before bt-ray[gpu] in the image (and DeepSpeed by install.sh): the
    versions written there are pyproject.toml's vLLM pin and gpu/extras.txt's DeepSpeed (the GPU node's)."""
    vllm = re.search(r'"vllm==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    deepspeed = re.search(r"^deepspeed==([\d.]+)", (REPO / "gpu" / "extras.txt").read_text(), re.M).group(1)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.findall(r'"vllm==([\d.]+)"', dockerfile) == [vllm]
    for text in (dockerfile, (REPO / "scripts" / "install.sh").read_text()):
        assert re.findall(r'"deepspeed==([\d.]+)"', text) == [deepspeed]
