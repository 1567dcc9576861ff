"""Session: Ray, the base model and the inference pool of one run, with a clean shutdown.

    with Session(config, run_name="demo") as session:
        program.set_lm(session.lm())            # base model
        program.set_lm(session.lm("demo-v1"))   # adapter version 1

The CLI's driver and scripts use the same object. Notebooks and scripts get one
with `bt_ray.init(...)`, which also makes it the session `bt_ray.BetterTogether`
runs on (started with defaults on first use if there is none):

    with bt_ray.init("configs/iris.yaml", ["train.epochs=2"]) as s:
        program.set_lm(s.lm())
        compiled = bt_ray.BetterTogether(metric=metric).compile(program, trainset=trainset)
"""

from __future__ import annotations

import atexit
import logging
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dspy

from bt_ray import storage
from bt_ray.config import RunConfig, load_config, validate
from bt_ray.errors import BtRayError, ConfigError
from bt_ray.inference import placement
from bt_ray.inference.lm import pool_lm
from bt_ray.inference.pool import InferencePool
from bt_ray.model import model_tag, resolve_model

logger = logging.getLogger(__name__)


def chat_adapter() -> dspy.ChatAdapter:
    # No JSON fallback: a small model's malformed answer should count as wrong, not trigger a second prompt format.
    return dspy.ChatAdapter(use_json_adapter_fallback=False)


class Session:
    def __init__(self, config: RunConfig, run_name: str | None = None, cache_dir: str | Path | None = None,
                 resume: bool = False):
        self.config = config
        self.run_name = run_name or config.run_name
        self.cache_dir = cache_dir
        self.resume = resume  # Python API: compile() continues the run named by config.name
        self.adapter = chat_adapter()
        self.model_dir: Path | None = None
        self.model_tag = ""
        self.pool: InferencePool | None = None
        self._owns_ray = False

    def start(self) -> "Session":
        if self.pool is not None:  # already started (bt_ray.init, then `with`)
            return self
        self._owns_ray = placement.connect(self.config.ray_address)
        try:
            placement.check_resources(self.config, placement.cluster_totals())
            # Several nodes: a plain output_dir must be one directory on all of them (adapters, checkpoints).
            storage.check_shared(self.config.output_dir, placement.alive_nodes(), placement.marker_visible)
            if self.cache_dir is not None:  # DSPy's response cache lives with the run: resume reuses it
                dspy.configure_cache(enable_disk_cache=self.config.inference.disk_cache, enable_memory_cache=True,
                                     disk_cache_dir=str(self.cache_dir))
            self.model_dir = resolve_model(self.config.model.name, self.config.model.cache_dir)
            self.model_tag = model_tag(self.model_dir)
            self.pool = InferencePool(self.config, str(self.model_dir), self.run_name)
            self.pool.start()
        except BaseException:  # `with` never calls __exit__ when __enter__ raises: release what started
            self.close()
            raise
        return self

    def lm(self, version: str | None = None) -> dspy.LM:
        """A dspy.LM for the base model (None) or a loaded adapter version."""
        inf = self.config.inference
        return pool_lm(self.pool, self.model_tag, version, temperature=inf.temperature, max_tokens=inf.max_tokens,
                       top_p=inf.top_p, seed=self.config.seed, max_inflight=inf.max_inflight)

    @property
    def train_gpus_per_worker(self) -> float:
        return placement.train_gpus_per_worker(self.config)

    @contextmanager
    def training(self) -> Iterator[None]:
        """Around Θ's fit: in placement timeshare the replicas sleep, so training gets their GPUs."""
        if self.config.placement.mode != "timeshare":
            yield
            return
        try:
            self.pool.sleep()
            yield
        except BaseException as exc:  # also after a sleep that failed half-way: the replicas that slept wake
            try:
                self.pool.wake()
            except Exception as wake_exc:  # told with the first error, not instead of it
                logger.error("waking the inference replicas after %s failed: %s", type(exc).__name__, wake_exc)
                exc.add_note(f"Waking the inference replicas afterwards failed too: {type(wake_exc).__name__}: "
                             f"{wake_exc}")
            raise
        self.pool.wake()

    def close(self) -> None:
        global _current
        if _current is self:
            _current = None
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "Session":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- the current session (Python API)

_current: Session | None = None


def init(config: RunConfig | str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
         resume: bool = False) -> Session:
    """Start bt-ray's session: join or start Ray, load the model, start the inference pool.

    `config` is a RunConfig, a YAML path (configs/iris.yaml) or None for the defaults; `overrides` are
    `dotted.key=value` strings as on the command line. With `resume=True` and `name=` set, a
    BetterTogether.compile continues the run of that name. Returns the session, which is also a context
    manager (`with bt_ray.init(...) as s:` shuts it down at the end); otherwise `bt_ray.shutdown()` or the
    end of the process does. Called again with no arguments, returns the running session.
    """
    global _current
    if _current is not None:
        if config is None and not overrides and not resume:
            return _current
        raise BtRayError("a bt-ray session is already running; call bt_ray.shutdown() (or leave its `with` "
                         "block) before starting one with another config")
    if not isinstance(config, RunConfig):
        config = load_config(config, list(overrides))
    elif overrides:
        raise ConfigError("pass overrides with a YAML path or None, not with a RunConfig (set its fields instead)")
    else:
        problems = validate(config)
        if problems:
            raise ConfigError(problems)
    if resume and not config.name:
        raise ConfigError("resume=True continues the run called name=...; set name (e.g. overrides=['name=mine'])")
    session = Session(config, run_name=config.name or f"session-{uuid.uuid4().hex[:6]}", resume=resume)
    session.start()
    _current = session
    atexit.register(session.close)
    return session


def shutdown() -> None:
    """Stop the current session (its pool, and Ray if it started it); a no-op when none is running."""
    if _current is not None:
        _current.close()


def current_session() -> Session | None:
    return _current
