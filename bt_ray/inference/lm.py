"""The DSPy side of the pool: a `dspy.LM` whose calls go to the replicas (no HTTP).

DSPy 3.4's custom-engine hook (`dspy.LM(model, engine=..., async_engine=...)`)
hands us a canonical `dspy.lm15.Request`; we turn it into chat messages and send
it to the pool. The model *version* is part of the LM's model string, so DSPy's
cache never serves an answer of one version to another:
    bt-ray/<model tag>@base                    the base model
    bt-ray/<model tag>+<weights>@<run>-v<N>    adapter version N of a run; <weights> is a digest of
                                               its files, so a new run under an old name is not
                                               answered from the old adapter's cache entries
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage

from bt_ray.errors import RequestError
from bt_ray.inference.engine import COMPLETION_MARKER, GenerationRequest, SamplingParams


def version_model(model_tag: str, version: str | None, weights: str | None = None) -> str:
    return f"bt-ray/{model_tag}{f'+{weights}' if weights else ''}@{version or 'base'}"


def request_messages(request: Request) -> tuple[dict[str, str], ...]:
    """lm15 Request -> the chat messages DSPy's adapter formatted (system first)."""
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    for message in request.messages:
        if message.role not in ("user", "assistant", "system"):
            raise ValueError(f"bt-ray engines take text chat messages; got a {message.role!r} message")
        messages.append({"role": message.role, "content": message.text or ""})
    return tuple(messages)


class PoolEngine:
    """Sync engine for dspy.LM: one Request -> one pool call -> one Response."""

    def __init__(self, pool: Any, version: str | None, seed: int = 0):
        self.pool = pool
        self.version = version
        self.seed = seed
        self._seen: Counter[tuple] = Counter()  # identical requests reaching us = fresh rollouts
        self._lock = threading.Lock()

    def complete(self, request: Request) -> Response:
        result = self.pool.generate(self.to_generation_request(request))
        message = Message.assistant([TextPart(result.text)])
        return Response(id=result.request_id or None, model=request.model, message=message,
                        finish_reason="length" if result.finish_reason == "length" else "stop",
                        usage=Usage(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens))

    def to_generation_request(self, request: Request) -> GenerationRequest:
        messages = request_messages(request)
        cfg = request.config
        stop = tuple(dict.fromkeys((*cfg.stop, COMPLETION_MARKER)))
        temperature = cfg.temperature if cfg.temperature is not None else 0.1
        top_p = cfg.top_p if cfg.top_p is not None else 1.0
        if not (0 <= temperature <= 2 and 0 < top_p <= 1):  # a per-call value (lm(..., temperature=...))
            raise RequestError(f"temperature must be in [0, 2] and top_p in (0, 1]; this call asked for "
                               f"temperature={temperature}, top_p={top_p}")
        sampling = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=cfg.max_tokens or 256, stop=stop,
                                  seed=self._seed_for(messages, cfg.temperature, cfg.seed))
        return GenerationRequest(messages=messages, sampling=sampling, adapter=self.version)

    def _seed_for(self, messages: tuple, temperature: float | None, seed: int | None) -> int:
        # Reproducible per request (and per the call's own seed), yet a repeated identical request
        # (DSPy bypassed its cache on purpose: a new rollout_id, n > 1) gets a new sample.
        key = hashlib.sha256(repr((self.seed, self.version, temperature, messages)).encode()).hexdigest()
        with self._lock:
            nth = self._seen[(key, seed)]
            self._seen[(key, seed)] += 1
        return (int(key[:12], 16) if seed is None else seed) + nth

    def stream(self, request: Request):
        raise NotImplementedError("bt-ray's pool engine does not stream; call without streaming")

    def close(self) -> None:
        pass  # the pool is owned by the session, not by the LM

    def __deepcopy__(self, memo: dict) -> "PoolEngine":
        return self  # engines are borrowed: copies of a program share the pool


class AsyncPoolEngine:
    """Async counterpart: runs the blocking pool call in a thread of an executor with `max_inflight`
    threads (asyncio.to_thread's default executor has min(32, CPUs + 4): it capped an async program's
    calls in flight far below what the replicas serve)."""

    def __init__(self, sync: PoolEngine, max_inflight: int = 64):
        self.sync = sync
        self.max_inflight = max_inflight

    async def complete(self, request: Request) -> Response:
        context = contextvars.copy_context()  # as asyncio.to_thread does: DSPy's settings follow the call
        return await asyncio.get_running_loop().run_in_executor(
            _threads(self.max_inflight), functools.partial(context.run, self.sync.complete, request))

    def stream(self, request: Request):
        raise NotImplementedError("bt-ray's pool engine does not stream; call without streaming")

    async def aclose(self) -> None:
        pass

    def __deepcopy__(self, memo: dict) -> "AsyncPoolEngine":
        return self


@functools.cache
def _threads(size: int) -> ThreadPoolExecutor:
    """One executor per size, shared by every async LM (threads start as calls need them)."""
    return ThreadPoolExecutor(max_workers=size, thread_name_prefix="bt-ray-async-lm")


def pool_lm(pool: Any, model_tag: str, version: str | None, *, temperature: float, max_tokens: int,
            top_p: float = 1.0, seed: int = 0, max_inflight: int = 64) -> dspy.LM:
    """A dspy.LM bound to one model version of the pool; its async calls (`acall`) run up to
    `max_inflight` at once."""
    engine = PoolEngine(pool, version, seed)
    kwargs = {"top_p": top_p} if top_p < 1.0 else {}
    weights = pool.adapter_digests.get(version) if version else None
    return dspy.LM(version_model(model_tag, version, weights), engine=engine,
                   async_engine=AsyncPoolEngine(engine, max_inflight),
                   temperature=temperature, max_tokens=max_tokens, cache=True, num_retries=0, **kwargs)
