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


def test_session_refuses_a_node_local_output_dir_before_the_model_loads(monkeypatch, tmp_path):
    """Session.start on a fake 2-node cluster (placement calls replaced, labelled) whose second node
    cannot see output_dir: ConfigError, and the model is never resolved."""
    from bt_ray import storage
    from bt_ray.config import load_config
    from bt_ray.session import Session

    nodes = [{"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"},
             {"NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2"}]
    monkeypatch.setattr(storage, "NODE_LOCAL_ROOTS", ())  # tmp_path is under /tmp
    monkeypatch.setattr("bt_ray.inference.placement.connect", lambda address: False)
    monkeypatch.setattr("bt_ray.inference.placement.cluster_totals", lambda: {"CPU": 8.0, "GPU": 0.0})
    monkeypatch.setattr("bt_ray.inference.placement.alive_nodes", lambda: nodes)
    monkeypatch.setattr("bt_ray.inference.placement.marker_visible",
                        lambda marker, token, ids: {ids[0]: True, ids[1]: False})
    monkeypatch.setattr("bt_ray.session.resolve_model", lambda *a: pytest.fail("the model must not load"))
    session = Session(load_config(None, [f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"1 of 2 alive nodes cannot see .* bbbbbbbbbbbb \(10.0.0.2\)"):
        session.start()


def test_a_new_adapter_under_an_old_version_name_is_not_answered_from_dspys_cache(tmp_path, monkeypatch):
    """Two runs named alike (e.g. the Python API, whose calls share DSPy's cache): run 2's adapter v1 has other
    weights than run 1's, so its answers must come from the engine, not run 1's cache entries. FAKE engines."""
    import dspy

    def adapter(folder, weights):
        folder.mkdir()
        (folder / "adapter_config.json").write_text('{"r": 8}')
        (folder / "adapter_model.safetensors").write_bytes(weights)
        return str(folder)

    monkeypatch.setattr(dspy, "cache", dspy.cache)  # put back after the test
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(tmp_path / "cache"))
    answers = []
    for run, weights in (("one", b"run 1's weights"), ("two", b"run 2's weights"), ("two", b"run 2's weights")):
        session = FakeSession(lambda request, run=run: f"[[ ## answer ## ]]\n{run}\n\n[[ ## completed ## ]]")
        session.model_tag = "same-model"  # one base model for both runs
        session.pool.load_adapter("exp-v1", adapter(tmp_path / f"{run}-{len(answers)}", weights))
        predict = dspy.Predict("question -> answer")
        predict.set_lm(session.lm("exp-v1"))
        with dspy.context(adapter=session.adapter):
            answers.append(f"{predict(question='q').answer} ({len(session.pool.requests)} engine call)")
    # The same weights again (a resume) are served from the cache: no engine call.
    assert answers == ["one (1 engine call)", "two (1 engine call)", "two (0 engine call)"]


@pytest.mark.parametrize("disk", [True, False])
def test_dspys_cache_lives_in_the_run_dir_on_disk_unless_disk_cache_is_off(monkeypatch, tmp_path, disk):
    """Session.start with placement calls replaced (labelled fakes); stopped where the model would load."""
    import dspy

    from bt_ray.config import load_config
    from bt_ray.session import Session

    class Stop(Exception):
        pass

    monkeypatch.setattr(dspy, "cache", dspy.cache)  # put back after the test
    monkeypatch.setattr("bt_ray.inference.placement.connect", lambda address: False)
    monkeypatch.setattr("bt_ray.inference.placement.cluster_totals", lambda: {"CPU": 8.0, "GPU": 0.0})
    monkeypatch.setattr("bt_ray.inference.placement.alive_nodes", lambda: [{"NodeID": "a" * 56}])
    monkeypatch.setattr("bt_ray.session.resolve_model", lambda *a: (_ for _ in ()).throw(Stop()))
    config = load_config(None, [f"output_dir={tmp_path}", f"inference.disk_cache={str(disk).lower()}"])
    with pytest.raises(Stop):
        Session(config, cache_dir=tmp_path / "cache").start()
    assert dspy.cache.enable_memory_cache
    assert dspy.cache.enable_disk_cache is disk
    assert dspy.cache.disk_cache_dir == str(tmp_path / "cache")


class _SleepyPool:
    """Test double of InferencePool's sleep/wake (labelled fake): records calls, fails where told."""

    def __init__(self, sleep_error=None, wake_error=None):
        self.calls, self.sleep_error, self.wake_error = [], sleep_error, wake_error

    def sleep(self):
        self.calls.append("sleep")
        if self.sleep_error:
            raise self.sleep_error

    def wake(self):
        self.calls.append("wake")
        if self.wake_error:
            raise self.wake_error


def _timeshare_session(pool):
    from bt_ray.config import load_config
    from bt_ray.session import Session

    session = Session(load_config(None, ["placement.mode=timeshare", "train.use_gpu=true",
                                         "inference.gpus_per_replica=1", "inference.engine=fake"]))
    session.pool = pool
    return session


def test_training_sleeps_and_wakes_the_replicas_and_a_failed_wake_does_not_hide_why():
    pool = _SleepyPool()
    with _timeshare_session(pool).training():
        assert pool.calls == ["sleep"]
    assert pool.calls == ["sleep", "wake"]

    # Θ fails, then waking fails too: Θ's error is raised, with the wake's as a note
    pool = _SleepyPool(wake_error=RuntimeError("replica-1 failed to wake"))
    with pytest.raises(ValueError, match="loss is nan") as err:
        with _timeshare_session(pool).training():
            raise ValueError("loss is nan")
    assert pool.calls == ["sleep", "wake"]
    assert "Waking the inference replicas afterwards failed too: RuntimeError: replica-1 failed to wake" in \
        err.value.__notes__[0]

    # a sleep that failed half-way: the replicas that slept wake, and the sleep's error is the one raised
    pool = _SleepyPool(sleep_error=RuntimeError("replica-0 failed to sleep"), wake_error=RuntimeError("no wake"))
    with pytest.raises(RuntimeError, match="replica-0 failed to sleep"):
        with _timeshare_session(pool).training():
            pytest.fail("training must not start when the replicas did not all sleep")
    assert pool.calls == ["sleep", "wake"]

    # only the wake fails: its error is raised
    pool = _SleepyPool(wake_error=RuntimeError("replica-1 failed to wake"))
    with pytest.raises(RuntimeError, match="replica-1 failed to wake"):
        with _timeshare_session(pool).training():
            pass
