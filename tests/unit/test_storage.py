"""Run storage (bt_ray/storage.py): URIs checked, a run mirrored to a file:// URI, node-local paths refused.

No Ray here: `check_shared` gets a fake node list and a fake node checker (labelled); the real
check on a 2-node Ray cluster is tests/integration/test_storage_on_cpu.py. file:// goes through the
same pyarrow.fs calls as s3:// or gs:// (only the filesystem class differs).
"""

from pathlib import Path

import pytest

from bt_ray import storage
from bt_ray.config import RunConfig, load_config
from bt_ray.errors import ConfigError
from bt_ray.state import RunState, StepRecord


@pytest.fixture(autouse=True)
def _own_caches(tmp_path, monkeypatch):
    """Working copies and fetched adapters go under this test's tmp dir, not ~/.cache."""
    monkeypatch.setattr(storage, "RUN_CACHE", str(tmp_path / "run-cache"))
    monkeypatch.setattr(storage, "ADAPTER_CACHE", str(tmp_path / "adapter-cache"))
    monkeypatch.setattr(storage, "_mirrors", {})


@pytest.mark.parametrize("uri", [
    "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/runs",
    "s3://AKIAEXAMPLE@bucket/runs",
    "gs://bucket/runs?access_key=AKIAEXAMPLE&secret_key=wJalrXUtnFEMI",
    "abfs://container:accountkey@account.dfs.core.windows.net/runs",
])
def test_credentials_in_a_uri_are_refused_without_echoing_them(uri):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"output_dir={uri}"])
    text = str(err.value)
    assert "output_dir" in text and "environment" in text
    assert "wJalrXUtnFEMI" not in text and "accountkey" not in text and "AKIAEXAMPLE" not in text


def test_uris_and_paths_that_are_fine():
    for ok in ["runs", "/mnt/bt-ray/runs", "s3://bucket/runs", "s3://bucket/runs?region=us-east-1",
               "gs://bucket/a/b", "abfs://container@account.dfs.core.windows.net/runs", "file:///srv/runs"]:
        assert storage.uri_problems(ok) == [], ok
    assert "scheme http://" in storage.uri_problems("http://host/runs")[0]


def test_run_dir_of_a_uri_is_a_local_working_copy(tmp_path):
    config = load_config(None, ["output_dir=s3://bucket/bt-ray/runs", "name=r1"])
    assert config.run_dir == tmp_path / "run-cache" / "s3_bucket_bt-ray_runs" / "r1"
    assert load_config(None, ["output_dir=/mnt/x", "name=r1"]).run_dir == Path("/mnt/x/r1")


def _config(uri: str, name: str = "r1") -> RunConfig:
    return load_config(None, [f"output_dir={uri}", f"name={name}"])


def _step(state: RunState, index: int, code: str) -> StepRecord:
    folder = state.step_dir(index, code)
    (folder / "program.json").write_text("{}")
    return StepRecord(index=index, code=code, strategy=code, version=None, program_path=str(folder / "program.json"))


def test_a_run_is_pushed_after_each_phase_and_pulled_on_resume(tmp_path):
    remote = tmp_path / "bucket"
    uri = f"file://{remote}"
    config = _config(uri)
    state = RunState.open(config.run_dir, config, resume=False)
    (config.run_dir / "cache").mkdir()
    (config.run_dir / "cache" / "cache.db").write_text("local only")
    state.add(_step(state, 0, "vanilla"))
    assert (remote / "r1" / "state.json").is_file()
    assert (remote / "r1" / "steps" / "00-vanilla" / "program.json").is_file()
    assert not (remote / "r1" / "cache").exists()  # DSPy's cache stays local
    assert state.mirror.push() == 0  # nothing changed since
    state.add(_step(state, 1, "p"))
    (config.run_dir / "results.md").write_text("| step |")
    state.sync()
    assert (remote / "r1" / "results.md").read_text() == "| step |"

    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        RunState.open(config.run_dir, config, resume=False)
    # Resume on another machine: an empty working copy, filled from the URI.
    import shutil

    shutil.rmtree(config.run_dir)
    resumed = RunState.open(config.run_dir, config, resume=True)
    assert [s.index for s in resumed.steps] == [0, 1]
    assert Path(resumed.steps[1].program_path).is_file()
    with pytest.raises(ConfigError, match="holds no run to resume"):
        RunState.open(_config(uri, "other").run_dir, _config(uri, "other"), resume=True)


def test_adapters_handed_to_other_nodes_are_uploaded_and_fetched(tmp_path):
    remote = tmp_path / "bucket"
    config = _config(f"file://{remote}")
    state = RunState.open(config.run_dir, config, resume=False)
    adapter = state.step_dir(2, "w") / "r1-v1" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 32}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 1000)

    shared = storage.shared_path(adapter)
    assert shared == f"file://{remote}/r1/steps/02-w/r1-v1/adapter"
    assert (remote / "r1" / "steps" / "02-w" / "r1-v1" / "adapter" / "adapter_config.json").is_file()
    assert storage.train_storage_path(adapter.parent.parent) == f"file://{remote}/r1/steps/02-w"
    local = Path(storage.fetch(shared))  # what a replica on another node does before loading it
    assert local.parent == tmp_path / "adapter-cache"
    assert (local / "adapter_config.json").read_text() == '{"r": 32}'
    assert (local / "adapter_model.safetensors").stat().st_size == 1000
    assert storage.fetch(shared) == str(local)  # cached: downloaded once per node
    # The same URI uploaded again with other weights (a run started over under its old name): not served stale.
    import os

    remote_weights = remote / "r1" / "steps" / "02-w" / "r1-v1" / "adapter" / "adapter_model.safetensors"
    remote_weights.write_bytes(b"\1" * 1000)
    os.utime(remote_weights, ns=(1, 1))
    again = Path(storage.fetch(shared))
    assert again != local and (again / "adapter_model.safetensors").read_bytes() == b"\1" * 1000
    # A plain path (local run or shared filesystem) is handed over as it is.
    assert storage.shared_path(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")
    assert storage.fetch(str(adapter)) == str(adapter)
    with pytest.raises(storage.StorageError, match="holds no files"):
        storage.fetch(f"file://{remote}/r1/steps/09-w/missing")


# ---------------------------------------------------------------- node-local paths (fake cluster, labelled)


def _nodes(*hosts: str) -> list[dict]:
    return [{"NodeID": f"{i:02d}" + "ab" * 27, "NodeManagerAddress": host} for i, host in enumerate(hosts)]


class FakeChecker:
    """Stands in for placement.marker_visible: nodes listed in `blind` do not see the driver's file."""

    def __init__(self, blind=()):
        self.blind, self.calls = set(blind), []

    def __call__(self, marker, token, node_ids):
        self.calls.append(marker)
        assert Path(marker).read_text() == token  # the driver wrote it before asking
        return {node: node not in self.blind for node in node_ids}


def test_one_node_or_a_uri_needs_no_check(tmp_path):
    checker = FakeChecker()
    storage.check_shared(str(tmp_path / "runs"), _nodes("10.0.0.1"), checker)
    storage.check_shared("s3://bucket/runs", _nodes("10.0.0.1", "10.0.0.2"), checker)
    assert checker.calls == []


def test_a_directory_every_node_sees_passes_and_the_marker_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "NODE_LOCAL_ROOTS", ())  # tmp_path is under /tmp
    checker = FakeChecker()
    storage.check_shared(str(tmp_path / "runs"), _nodes("10.0.0.1", "10.0.0.2"), checker)
    assert len(checker.calls) == 1 and not Path(checker.calls[0]).exists()


def test_nodes_that_cannot_see_output_dir_are_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "NODE_LOCAL_ROOTS", ())  # tmp_path is under /tmp
    nodes = _nodes("10.0.0.1", "10.0.0.2", "10.0.0.3")
    with pytest.raises(ConfigError) as err:
        storage.check_shared(str(tmp_path / "runs"), nodes, FakeChecker(blind=[nodes[2]["NodeID"]]))
    text = str(err.value)
    assert "output_dir=" in text and str(tmp_path / "runs") in text and "1 of 3 alive nodes" in text
    assert nodes[2]["NodeID"][:12] in text and "10.0.0.3" in text and nodes[1]["NodeID"][:12] not in text
    assert "shared filesystem" in text and "s3://" in text


def test_tmp_on_several_machines_is_refused_without_asking_the_nodes():
    checker = FakeChecker()
    with pytest.raises(ConfigError, match="node-local on this cluster of 2 nodes on 2 machines"):
        storage.check_shared("/tmp/bt-ray-runs", _nodes("10.0.0.1", "10.0.0.2"), checker)
    with pytest.raises(ConfigError, match="node-local"):
        storage.check_shared("/dev/shm/runs", _nodes("10.0.0.1", "10.0.0.2"), checker)
    assert checker.calls == []


def test_bt_ray_run_with_a_uri_output_dir_uploads_results_and_resumes_elsewhere(tmp_path, monkeypatch):
    """Driver (bt-ray run) on a fake session and a fake trainer (labelled; no Ray, no model), output_dir=file://."""
    import shutil
    from types import SimpleNamespace

    from bt_ray.driver import Driver

    from .fakes import FakeSession
    from .test_prompt_phase import noisy_classifier

    trained = []

    def fake_train_lora(examples, config, base_model_dir, output_dir, name, **kwargs):
        trained.append(name)
        adapter = Path(output_dir) / name / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
        return SimpleNamespace(adapter_dir=str(adapter), examples=len(examples), dropped=0, trained_tokens=10,
                               total_tokens=30, steps=1, losses=[2.0], wall_s=0.1, workers=1)

    monkeypatch.setattr("bt_ray.phases.finetune.train_lora", fake_train_lora)
    remote = tmp_path / "bucket"
    config = load_config("configs/iris.yaml", [f"output_dir=file://{remote}", "name=t", "strategy=p -> w",
                                                    "task.dev_size=10", "task.test_size=10"])
    Driver(config).run(session=FakeSession(noisy_classifier))
    run = remote / "t"
    for name in ("results.json", "results.md", "scores.png", "config.yaml", "state.json", "events.jsonl",
                 "steps/02-w/t-v1/adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert trained == ["t-v1"]

    shutil.rmtree(config.run_dir)  # another machine: nothing local
    results = Driver(config, resume=True).run(session=FakeSession(noisy_classifier))
    assert trained == ["t-v1"] and [s["strategy"] for s in results["steps"]] == ["vanilla", "Π", "Π→Θ"]
