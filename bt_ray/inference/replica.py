"""ReplicaActor: a thin Ray actor around one engine.

Async methods make it an async actor: many `generate` calls are in flight at once
and the engine batches them. Routing, batching and adapter bookkeeping live
elsewhere (router.py, the engine), so this file stays a shell.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bt_ray import storage
from bt_ray.inference.engine import GenerationRequest, GenerationResult, engine_class

logger = logging.getLogger(__name__)


class ReplicaActor:
    def __init__(self, replica_id: str, engine: str, model_dir: str, config: Any, dtype: str = "auto"):
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{replica_id}] %(name)s: %(message)s")
        self.replica_id = replica_id
        self.engine = engine_class(engine)(model_dir=model_dir, config=config, dtype=dtype)
        self.generate_calls = 0
        self.generate_s = 0.0  # summed over calls, from entering generate to its answer
        logger.info("replica ready: engine=%s model=%s", engine, model_dir)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        start = time.perf_counter()
        try:
            return await self.engine.generate(request)
        finally:
            self.generate_calls += 1
            self.generate_s += time.perf_counter() - start

    async def load_adapter(self, name: str, path: str) -> str:
        path = await asyncio.to_thread(storage.fetch, path)  # a URI: downloaded to this node's cache first
        await self.engine.load_adapter(name, path)
        logger.info("adapter %s loaded from %s", name, path)
        return self.replica_id

    async def unload_adapter(self, name: str) -> str:
        await self.engine.unload_adapter(name)
        return self.replica_id

    async def sleep(self) -> None:
        await self.engine.sleep()

    async def wake(self) -> None:
        await self.engine.wake()

    async def health(self) -> dict[str, Any]:
        """The engine's state and counters, and this actor's time in generate: a caller's latency less
        generate_s is the Ray path (sending the call, queueing on the event loop, the answer coming back)."""
        return {"replica": self.replica_id, **(await self.engine.health()),
                "generate_calls": self.generate_calls, "generate_s": self.generate_s}
