"""The engine seam: what an inference replica needs from a backend.

Engines are asynchronous: many requests are awaited at once and the engine
decides how to batch them. Implementations are picked by name from a lazy
registry so that optional backends (vLLM) are only imported when asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# DSPy's ChatAdapter ends every answer with this marker; generation stops there.
COMPLETION_MARKER = "[[ ## completed ## ]]"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.1
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = (COMPLETION_MARKER,)
    seed: int | None = None  # per-request seed: same request, same seed -> same sample


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[dict[str, str], ...]  # chat messages: {"role": ..., "content": ...}
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # None = base model; else a loaded adapter version name
    request_id: str = ""


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str  # the completion, stop string excluded
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    adapter: str | None = None
    cached_prompt_tokens: int = 0  # prompt tokens served from a reused prefix KV cache


@runtime_checkable
class Engine(Protocol):
    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...

    async def health(self) -> dict[str, Any]: ...


# name -> "module:Class"; imported only when used.
ENGINES = {
    "fake": "bt_ray.inference.fake:FakeEngine",
    "transformers": "bt_ray.inference.transformers_engine:TransformersEngine",
    "vllm": "bt_ray.inference.vllm_compat:VLLMEngine",
}


def engine_class(name: str) -> type:
    if name not in ENGINES:
        raise KeyError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)
