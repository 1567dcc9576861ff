"""bt_ray.init / shutdown: bad input fails before Ray starts; one current session (fake, labelled; no Ray)."""

import pytest

import bt_ray
from bt_ray.errors import BtRayError, ConfigError

from .fakes import FakeSession


def test_bad_config_fails_before_ray_starts(monkeypatch):
    import ray

    monkeypatch.setattr("bt_ray.session._current", None)
    with pytest.raises(ConfigError, match="train.epochs"):
        bt_ray.init(None, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="resume=True continues the run called name"):
        bt_ray.init(resume=True)
    assert not ray.is_initialized()


def test_one_current_session(monkeypatch):
    fake = FakeSession()
    monkeypatch.setattr("bt_ray.session._current", fake)
    assert bt_ray.init() is fake and bt_ray.current_session() is fake
    with pytest.raises(BtRayError, match="already running"):
        bt_ray.init("configs/iris.yaml")
