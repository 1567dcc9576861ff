"""InferencePool: the replicas of one run and the one choke point for model calls.

Every model call of every phase goes through `generate`, from many driver threads
at once. Adapters are versioned by name (`<run>-v<N>`), loaded on every replica;
the base model is always available as version None.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from dataclasses import dataclass, field

from bt_ray.config import RunConfig
from bt_ray.errors import AdapterError, EngineError
from bt_ray.inference import placement
from bt_ray.inference.engine import GenerationRequest, GenerationResult
from bt_ray.inference.replica import ReplicaActor
from bt_ray.inference.router import Router

logger = logging.getLogger(__name__)


@dataclass
class Usage:
    """What the pool served, per model version; phases diff two snapshots for their costs."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    truncated: int = 0  # answers cut at max_tokens
    by_version: dict[str, int] = field(default_factory=dict)

    def add(self, result: GenerationResult) -> None:
        self.requests += 1
        self.prompt_tokens += result.prompt_tokens
        self.cached_prompt_tokens += result.cached_prompt_tokens
        self.generated_tokens += result.completion_tokens
        self.truncated += result.finish_reason == "length"
        version = result.adapter or "base"
        self.by_version[version] = self.by_version.get(version, 0) + 1

    def since(self, earlier: "Usage") -> "Usage":
        return Usage(
            self.requests - earlier.requests,
            self.prompt_tokens - earlier.prompt_tokens,
            self.cached_prompt_tokens - earlier.cached_prompt_tokens,
            self.generated_tokens - earlier.generated_tokens,
            self.truncated - earlier.truncated,
            {k: v - earlier.by_version.get(k, 0) for k, v in self.by_version.items()
             if v - earlier.by_version.get(k, 0)},
        )

    def copy(self) -> "Usage":
        return Usage(self.requests, self.prompt_tokens, self.cached_prompt_tokens, self.generated_tokens,
                     self.truncated, dict(self.by_version))


class InferencePool:
    def __init__(self, config: RunConfig, model_dir: str, run_name: str):
        self.config = config
        self.model_dir = model_dir
        self.run_name = run_name
        self.replicas: dict[str, object] = {}
        self.adapters: dict[str, str] = {}  # version name -> adapter dir
        self.usage = Usage()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.router: Router | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 300.0) -> None:
        import ray

        inf = self.config.inference
        actor_cls = ray.remote(ReplicaActor)
        for i in range(inf.replicas):
            rid = f"replica-{i}"
            options = placement.replica_options(self.config, self.run_name, i)
            self.replicas[rid] = actor_cls.options(**options).remote(
                rid, inf.engine, self.model_dir, inf, self.config.model.dtype)
        asked = {"CPU": inf.cpus_per_replica, "GPU": inf.gpus_per_replica}
        health = placement.wait_ready([a.health.remote() for a in self.replicas.values()],
                                      "inference replicas", timeout_s, asked)
        self.router = Router(list(self.replicas))
        logger.info("inference pool ready: %d replica(s), engine=%s", len(health), inf.engine)

    def shutdown(self) -> None:
        import ray

        for actor in self.replicas.values():
            ray.kill(actor)
        self.replicas.clear()

    # ------------------------------------------------------------ calls

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Send one request to the least-loaded replica and wait for its answer (thread-safe)."""
        import ray

        if request.adapter is not None and request.adapter not in self.adapters:
            raise AdapterError(f"model version {request.adapter!r} is not loaded in the pool; "
                               f"loaded: {', '.join(self.adapters) or 'none (base only)'}")
        request_id = request.request_id or f"req-{next(self._ids)}"
        replica_id = self.router.pick(prefix_key(request))
        try:
            ref = self.replicas[replica_id].generate.remote(_with_id(request, request_id))
            result = ray.get(ref, timeout=self.config.inference.request_timeout_s)
        except Exception as exc:
            raise EngineError(
                f"{replica_id} failed request {request_id} (model version {request.adapter or 'base'}, "
                f"{len(request.messages)} messages): {type(exc).__name__}: {exc}") from exc
        finally:
            self.router.done(replica_id)
        with self._lock:
            self.usage.add(result)
        return result

    def usage_snapshot(self) -> Usage:
        with self._lock:
            return self.usage.copy()

    # ------------------------------------------------------------ adapters

    def load_adapter(self, name: str, path: str) -> None:
        """Load a new adapter version on every replica; a name is never reused (stale caches)."""
        import ray

        if name in self.adapters:
            raise AdapterError(f"adapter version {name!r} is already loaded; each fine-tune gets a new name")
        refs = {rid: actor.load_adapter.remote(name, path) for rid, actor in self.replicas.items()}
        for rid, ref in refs.items():
            try:
                ray.get(ref)
            except Exception as exc:
                raise AdapterError(f"{rid} could not load adapter {name!r} from {path}: {exc}") from exc
        self.adapters[name] = path
        logger.info("adapter %s loaded on %d replica(s)", name, len(refs))

    def unload_adapter(self, name: str) -> None:
        import ray

        ray.get([actor.unload_adapter.remote(name) for actor in self.replicas.values()])
        self.adapters.pop(name, None)

    def health(self) -> list[dict]:
        import ray

        return ray.get([actor.health.remote() for actor in self.replicas.values()])


def prefix_key(request: GenerationRequest) -> str | None:
    """Requests with the same adapter and the same messages but the last share a prompt prefix."""
    if len(request.messages) < 2:
        return None
    digest = hashlib.sha1(repr((request.adapter, request.messages[:-1])).encode()).hexdigest()
    return digest[:16]


def _with_id(request: GenerationRequest, request_id: str) -> GenerationRequest:
    if request.request_id == request_id:
        return request
    return GenerationRequest(request.messages, request.sampling, request.adapter, request_id)
