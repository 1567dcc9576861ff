"""Bad input is refused before Ray starts or a model loads, naming the key and the fix."""

import subprocess
import sys

import pytest

from bt_ray.config import load_config
from bt_ray.driver import Driver
from bt_ray.errors import ConfigError
from bt_ray.inference.placement import check_resources
from bt_ray.model import check_model


def test_missing_model_path_names_the_key(tmp_path):
    problem = check_model(str(tmp_path / "no-such-model"))
    assert problem.startswith("model.name:") and "checkpoint directory" in problem
    (tmp_path / "empty").mkdir()
    assert "config.json" in check_model(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="model.name"):
        Driver(load_config("configs/iris.yaml", [f"model.name={tmp_path}/nope", f"output_dir={tmp_path}"]))


def test_more_replicas_and_workers_than_cpus():
    config = load_config(None, ["inference.replicas=2", "train.num_workers=2"])
    with pytest.raises(ConfigError) as err:
        check_resources(config, {"CPU": 2.0, "GPU": 0.0})
    assert "inference.replicas" in str(err.value) and "train.num_workers" in str(err.value)
    assert "4 CPUs" in str(err.value) and "has 2" in str(err.value)
    check_resources(load_config(None, ["inference.cpus_per_replica=0.5", "train.cpus_per_worker=0.5",
                                       "train.num_workers=2"]), {"CPU": 2.0, "GPU": 0.0})


def test_gpus_asked_on_a_cpu_cluster():
    config = load_config(None, ["placement.mode=split", "inference.gpus_per_replica=1", "train.use_gpu=true"])
    with pytest.raises(ConfigError, match="needs 2 GPUs.*inference.gpus_per_replica=1.*has 0"):
        check_resources(config, {"CPU": 8.0, "GPU": 0.0})


def test_subsample_larger_than_train_split(tmp_path):
    with pytest.raises(ConfigError, match="prompt.train_size \\+ prompt.val_size = 350"):
        Driver(load_config("configs/iris.yaml", ["prompt.train_size=100", "prompt.val_size=250",
                                                  f"output_dir={tmp_path}"]))


def test_cli_exit_code_2_and_all_problems_on_stderr(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bt_ray.cli", "run", "configs/iris.yaml", "strategy=p -> q",
                             "train.epoch=1", f"output_dir={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "strategy: step 2" in result.stderr and "train.epoch: unknown key" in result.stderr
    assert not (tmp_path / "iris-invalid-s0").exists()  # nothing was started


def test_offline_data_shrinks_prompt_subsamples_and_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="bt_ray.driver"):
        driver = Driver(load_config("configs/hotpotqa.yaml", ["task.source=offline", f"output_dir={tmp_path}"]))
    assert driver.splits.offline and len(driver.splits.train) == 18
    prompt = driver.config.prompt
    assert (prompt.train_size, prompt.val_size) == (5, 13)  # the paper's 100 : 250, within 18
    assert "data: OFFLINE stand-in" in caplog.text and "Π uses 5 + 13" in caplog.text
    # real data is never shrunk silently
    with pytest.raises(ConfigError, match="prompt.train_size \\+ prompt.val_size = 350"):
        Driver(load_config("configs/iris.yaml", ["prompt.train_size=100", "prompt.val_size=250",
                                                  f"output_dir={tmp_path}"]))


def test_real_data_missing_is_a_config_error_naming_the_download(tmp_path):
    with pytest.raises(ConfigError, match=f"bt-ray data download gsm8k --to {tmp_path}"):
        Driver(load_config("configs/gsm8k.yaml", ["task.source=real", f"task.data_dir={tmp_path}",
                                                   f"output_dir={tmp_path}"]))
