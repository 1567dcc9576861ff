from pathlib import Path

import pytest

import yaml

from bt_ray.config import RunConfig, describe, load_config
from bt_ray.errors import ConfigError
from bt_ray.sweep import load_sweep

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def test_defaults_are_the_papers():
    cfg = RunConfig()
    assert (cfg.train.lora_rank, cfg.train.lora_alpha, cfg.train.lora_dropout) == (32, 64, 0.0)
    assert cfg.train.target_modules == ["q_proj", "k_proj"]
    assert (cfg.train.epochs, cfg.train.learning_rate, cfg.train.batch_size) == (5, 1e-5, 8)
    assert (cfg.prompt.train_size, cfg.prompt.val_size, cfg.prompt.num_candidates) == (100, 250, 6)
    assert (cfg.prompt.max_bootstrapped_demos, cfg.prompt.max_labeled_demos) == (3, 3)
    assert cfg.inference.temperature == 0.1


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    if "tasks" in yaml.safe_load(path.read_text()):  # a sweep file: every cell's run config loads
        assert load_sweep(path).cells
    else:
        load_config(path)
    assert path.read_text().lstrip().startswith("#"), f"{path.name} should open with a comment giving its command"


def test_overrides_are_cast_to_field_types(tmp_path):
    cfg = load_config(None, ["train.epochs=2", "train.learning_rate=1e-4", "inference.cpus_per_replica=1",
                             "train.target_modules=q_proj,v_proj", "strategy=p -> w", "name=x", "train.bf16=false"])
    assert cfg.train.epochs == 2 and cfg.train.learning_rate == 1e-4
    assert cfg.inference.cpus_per_replica == 1.0 and isinstance(cfg.inference.cpus_per_replica, float)
    assert cfg.train.target_modules == ["q_proj", "v_proj"]
    assert cfg.strategy == "p -> w" and cfg.train.bf16 is False


def test_all_problems_reported_together_with_dotted_paths(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("strategy: p -> q\ntrain:\n  epoch: 3\n  lora_rank: many\ninference:\n  replicas: 0\nfoo: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    text = str(err.value)
    for expected in ("strategy: step 2", "train.epoch: unknown key; did you mean 'epochs'",
                     "train.lora_rank: expected an integer", "inference.replicas: must be >= 1", "foo: unknown key"):
        assert expected in text, text
    assert len(err.value.problems) == 5


def test_malformed_yaml_and_missing_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(f)


def test_batch_size_must_divide(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size: 8 is not a multiple"):
        load_config(None, ["train.micro_batch_size=3"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.epochs"])


def test_reference_lists_every_leaf_with_help():
    rows = describe()
    keys = [k for k, _, _ in rows]
    assert "train.lora_rank" in keys and "inference.max_batch_size" in keys and "strategy" in keys
    assert all(meaning for _, _, meaning in rows)


def test_readme_config_reference_is_current():
    from bt_ray.cli import reference_markdown

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    assert reference_markdown() in readme, "regenerate with: python scripts/update_readme_reference.py"


@pytest.mark.parametrize("override, message", [
    ("train.cpus_per_worker=0", "train.cpus_per_worker: CPU training workers need CPUs; set it > 0"),
    ("train.torch_threads=-2", "train.torch_threads: must be a number >= 0, got -2"),
    ("inference.torch_threads=-1", "inference.torch_threads: must be a number >= 0, got -1"),
    ("train.max_failures=-1", "train.max_failures: must be a number >= 0, got -1"),
    ("inference.batch_wait_ms=-5", "inference.batch_wait_ms: must be a number >= 0"),
    ("inference.prefix_cache_tokens=-1", "inference.prefix_cache_tokens: must be a number >= 0"),
    ("train.learning_rate=.nan", "train.learning_rate: must be a number > 0, got nan"),
    ("train.learning_rate=.inf", "train.learning_rate: must be a number > 0, got inf"),
    ("placement.timeout_s=.nan", "placement.timeout_s: must be a number > 0, got nan"),
    ("inference.request_timeout_s=0", "inference.request_timeout_s: must be a number > 0, got 0"),
    ("name=..", "name: '..' must be a plain, non-empty directory name"),
    ("name=.", "name: '.' must be a plain, non-empty directory name"),
])
def test_values_that_would_fail_only_in_a_worker_are_refused_up_front(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_a_sweep_file_given_as_a_run_config_points_to_bt_ray_sweep():
    with pytest.raises(ConfigError) as err:
        load_config(Path("configs/sweep_cpu.yaml"))
    assert len(err.value.problems) == 1 and "run it with `bt-ray sweep configs/sweep_cpu.yaml`" in str(err.value)
