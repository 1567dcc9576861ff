"""model.name as a public id (org/name): found in the local cache without network, downloaded only when allowed."""

import huggingface_hub
import pytest

from bt_ray.errors import ConfigError
from bt_ray.model import check_model, is_hub_id, resolve_model


def fake_cached(cache_dir, repo="org/tiny"):
    """A Hugging Face cache entry as snapshot_download leaves it (a fake: a config.json, no weights)."""
    org, name = repo.split("/")
    root = cache_dir / f"models--{org}--{name}"
    snapshot = root / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("a" * 40)
    return snapshot


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Fails the test if anything asks huggingface_hub for a file without local_files_only."""
    real = huggingface_hub.snapshot_download
    calls = []

    def guarded(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if not kwargs.get("local_files_only"):
            raise AssertionError(f"network download of {repo_id} attempted")
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", guarded)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # the default cache: empty
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    return calls


def test_public_id_offline_and_not_cached_names_the_key_and_the_fix(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problem = check_model("meta-llama/Meta-Llama-3-8B-Instruct", str(tmp_path))
    assert problem.startswith("model.name: 'meta-llama/Meta-Llama-3-8B-Instruct' is a public model id")
    assert "HF_HUB_OFFLINE=1" in problem and "hf download meta-llama/Meta-Llama-3-8B-Instruct" in problem
    assert "local checkpoint directory" in problem
    with pytest.raises(ConfigError, match="model.name"):
        resolve_model("meta-llama/Meta-Llama-3-8B-Instruct", str(tmp_path))


def test_public_id_in_the_cache_resolves_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_cached(tmp_path)
    assert check_model("org/tiny", str(tmp_path)) is None
    assert resolve_model("org/tiny", str(tmp_path)) == snapshot


def test_preflight_never_downloads_and_resolve_downloads_into_cache_dir(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check_model("org/tiny", str(tmp_path)) is None  # downloads allowed: checked when the run starts
    assert all(no_network)  # only cache look-ups
    fetched = []

    def fake_download(repo_id, **kwargs):  # a fake hub: records the call, leaves a snapshot
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        fetched.append((repo_id, kwargs["cache_dir"]))
        return str(fake_cached(tmp_path, repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert (resolve_model("org/tiny", str(tmp_path)) / "config.json").is_file()
    assert fetched == [("org/tiny", str(tmp_path))]

    def gated(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached") if kwargs.get("local_files_only") \
            else OSError("401 gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(ConfigError, match=r"model.name: could not download 'org/other' \(OSError: 401 gated"):
        resolve_model("org/other", str(tmp_path))


def test_what_counts_as_a_public_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("mistralai/Mistral-7B-Instruct-v0.2")
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert not is_hub_id("models/mine")  # an existing local directory wins
    assert not is_hub_id("/abs/path") and not is_hub_id("./a/b") and not is_hub_id("a/b/c")
    assert not is_hub_id("smollm2-135m")


def test_a_conversion_replaces_an_incomplete_copy_and_leaves_no_temporary_folder(tmp_path):
    from bt_ray.model import _install

    def converted(path, weights=b"w"):
        path.mkdir()
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(weights)
        return path

    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()  # a conversion killed before its move, or a folder emptied by hand
    _install(converted(tmp_path / "tmp1"), target)
    assert (target / "model.safetensors").read_bytes() == b"w" and not (tmp_path / "tmp1").exists()
    _install(converted(tmp_path / "tmp2", b"late"), target)  # another process finished second
    assert (target / "model.safetensors").read_bytes() == b"w" and sorted(tmp_path.iterdir()) == [target]
