"""Session: Ray, the base model and the inference pool of one run, with a clean shutdown.

    with Session(config, run_name="demo") as session:
        program.set_lm(session.lm(None))        # base model
        program.set_lm(session.lm("demo-v1"))   # adapter version 1

The CLI's driver and scripts use the same object.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dspy

from bt_ray.config import RunConfig
from bt_ray.inference import placement
from bt_ray.inference.lm import pool_lm
from bt_ray.inference.pool import InferencePool
from bt_ray.model import model_tag, resolve_model

logger = logging.getLogger(__name__)


def chat_adapter() -> dspy.ChatAdapter:
    # No JSON fallback: a small model's malformed answer should count as wrong, not trigger a second prompt format.
    return dspy.ChatAdapter(use_json_adapter_fallback=False)


class Session:
    def __init__(self, config: RunConfig, run_name: str | None = None, cache_dir: str | Path | None = None):
        self.config = config
        self.run_name = run_name or config.run_name
        self.cache_dir = cache_dir
        self.adapter = chat_adapter()
        self.model_dir: Path | None = None
        self.model_tag = ""
        self.pool: InferencePool | None = None
        self._owns_ray = False

    def start(self) -> "Session":
        self._owns_ray = placement.connect(self.config.ray_address)
        placement.check_resources(self.config, placement.cluster_totals())
        if self.cache_dir is not None:  # DSPy's response cache lives with the run: resume reuses it
            dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(self.cache_dir))
        self.model_dir = resolve_model(self.config.model.name, self.config.model.cache_dir)
        self.model_tag = model_tag(self.model_dir)
        self.pool = InferencePool(self.config, str(self.model_dir), self.run_name)
        self.pool.start()
        return self

    def lm(self, version: str | None) -> dspy.LM:
        """A dspy.LM for the base model (None) or a loaded adapter version."""
        inf = self.config.inference
        return pool_lm(self.pool, self.model_tag, version, temperature=inf.temperature, max_tokens=inf.max_tokens,
                       top_p=inf.top_p, seed=self.config.seed)

    @property
    def train_gpus_per_worker(self) -> float:
        return placement.train_gpus_per_worker(self.config)

    @contextmanager
    def training(self) -> Iterator[None]:
        """Around Θ's fit: in placement timeshare the replicas sleep, so training gets their GPUs."""
        timeshare = self.config.placement.mode == "timeshare"
        if timeshare:
            self.pool.sleep()
        try:
            yield
        finally:
            if timeshare:
                self.pool.wake()

    def close(self) -> None:
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
