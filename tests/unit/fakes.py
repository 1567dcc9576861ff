"""Test doubles (labelled as such): an in-process pool over FakeEngine, no Ray, no model."""

from __future__ import annotations

import asyncio
import threading
import uuid

from bt_ray.inference.fake import FakeEngine
from bt_ray.inference.pool import Usage


def unique_tag() -> str:
    """A model tag of its own, so DSPy's response cache never serves one test's fake answers to another."""
    return f"fake-{uuid.uuid4().hex[:8]}"


class FakePool:
    """Same surface as InferencePool for the phases: generate, adapters, load_adapter, usage_snapshot."""

    def __init__(self, responder=None):
        self.engine = FakeEngine(responder=responder)
        self.adapters: dict[str, str] = {}
        self.adapter_digests: dict[str, str | None] = {}
        self.usage = Usage()
        self.requests = []
        self._lock = threading.Lock()

    def generate(self, request):
        result = asyncio.run(self.engine.generate(request))
        with self._lock:
            self.usage.add(result)
            self.requests.append(request)
        return result

    def load_adapter(self, name, path):
        from bt_ray.model import adapter_digest

        asyncio.run(self.engine.load_adapter(name, path))
        self.adapters[name], self.adapter_digests[name] = path, adapter_digest(path)

    def usage_snapshot(self):
        with self._lock:
            return self.usage.copy()


class FakeSession:
    """Same surface as bt_ray.session.Session, over a FakePool (no Ray, no model)."""

    def __init__(self, responder=None, model_dir="/fake/model", config=None):
        from bt_ray.config import RunConfig
        from bt_ray.session import chat_adapter

        self.config = config or RunConfig()
        self.resume = False
        self.pool = FakePool(responder)
        self.adapter = chat_adapter()
        self.model_dir = model_dir
        self.model_tag = unique_tag()

    train_gpus_per_worker = 0.0

    def training(self):
        import contextlib

        return contextlib.nullcontext()

    def lm(self, version=None):
        from bt_ray.inference.lm import pool_lm

        return pool_lm(self.pool, self.model_tag, version, temperature=0.1, max_tokens=64)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass
