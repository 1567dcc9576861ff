"""FakeEngine: deterministic canned completions, for tests only (like DSPy's DummyLM).

It implements the engine protocol without a model. The answer is a function of
the last user message and the adapter name, so tests can check routing,
batching and adapter versioning without weights. A last message starting with
`fake-sleep:<seconds>` is answered that much later (tests of busy and hung replicas).
An adapter folder holding a file `fake-fail-once` fails to load on the one replica that
claims (deletes) that file first (tests of a version that loads on some replicas only); a file
`fake-hang-once` holding a number of seconds makes the one replica that claims it load that much later
(tests of a replica that does not answer a load in time); a file `fake-fail-unload-once` fails the unload of
that folder's version on the one replica that claims it. A file `fake-fail-wake-once` in the model directory
fails wake() on the one replica that claims it. A file `fake-loop-load` in the model directory holding
"<period_ms> <busy_ms>" keeps the engine's event loop busy (pure Python, holding the GIL) for busy_ms of
every period_ms from its first request on, as vLLM's per-step output processing keeps a replica's loop busy
(bench/pool_overhead.py --loop-load).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any, Callable

from bt_ray.inference.engine import GenerationRequest, GenerationResult

Responder = Callable[[GenerationRequest], str]
FAIL_ONCE = "fake-fail-once"
HANG_ONCE = "fake-hang-once"
FAIL_UNLOAD_ONCE = "fake-fail-unload-once"
FAIL_WAKE_ONCE = "fake-fail-wake-once"
LOOP_LOAD = "fake-loop-load"


def echo_responder(request: GenerationRequest) -> str:
    """Answers in DSPy's ChatAdapter format with a stable, input-dependent value."""
    last = request.messages[-1]["content"]
    digest = hashlib.sha256(f"{request.adapter}|{last}".encode()).hexdigest()[:6]
    return f"[[ ## reasoning ## ]]\nfake reasoning {digest}\n\n[[ ## answer ## ]]\n{digest}\n\n"


class FakeEngine:
    def __init__(self, model_dir: str = "", config: Any = None, dtype: str = "auto",
                 responder: Responder | None = None, delay_s: float = 0.0,
                 loop_load: tuple[float, float] | None = None):
        self.model_dir = model_dir
        self.responder = responder or echo_responder
        self.delay_s = delay_s
        self.loop_load = loop_load or _read_loop_load(model_dir)  # (period_ms, busy_ms)
        self._busy: asyncio.Task | None = None
        self.adapters: dict[str, str] = {}
        self.asleep = False
        self.served = 0

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.asleep:
            raise RuntimeError("engine is asleep; call wake() first")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise KeyError(f"adapter {request.adapter!r} is not loaded")
        if self.loop_load and self._busy is None:
            self._busy = asyncio.get_running_loop().create_task(_keep_busy(*self.loop_load))
        last = request.messages[-1]["content"]
        delay = float(last.split()[0].removeprefix("fake-sleep:")) if last.startswith("fake-sleep:") else 0.0
        if self.delay_s or delay:
            await asyncio.sleep(self.delay_s + delay)
        text = self.responder(request)
        self.served += 1
        prompt_tokens = sum(len(m["content"].split()) for m in request.messages)
        return GenerationResult(request.request_id, text, prompt_tokens, len(text.split()), "stop", request.adapter)

    async def load_adapter(self, name: str, path: str) -> None:
        delay = _claim(os.path.join(path, HANG_ONCE))
        if delay is not None:
            await asyncio.sleep(float(delay))
        if _claim(os.path.join(path, FAIL_ONCE)) is not None:
            raise RuntimeError(f"fake engine: {FAIL_ONCE} in {path}")
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name in self.adapters and _claim(os.path.join(self.adapters[name], FAIL_UNLOAD_ONCE)) is not None:
            raise RuntimeError(f"fake engine: {FAIL_UNLOAD_ONCE} in {self.adapters[name]}")
        self.adapters.pop(name, None)

    async def sleep(self) -> None:
        self.asleep = True

    async def wake(self) -> None:
        if _claim(os.path.join(self.model_dir, FAIL_WAKE_ONCE)) is not None:
            raise RuntimeError(f"fake engine: {FAIL_WAKE_ONCE} in {self.model_dir}")
        self.asleep = False

    async def health(self) -> dict[str, Any]:
        return {"engine": "fake", "adapters": sorted(self.adapters), "served": self.served, "asleep": self.asleep}


async def _keep_busy(period_ms: float, busy_ms: float) -> None:
    while True:
        until = time.perf_counter() + busy_ms / 1e3
        while time.perf_counter() < until:  # a spin, not a sleep: the loop and the GIL are held
            pass
        await asyncio.sleep(max(0.0, period_ms - busy_ms) / 1e3)


def write_loop_load(model_dir: str, period_ms: float, busy_ms: float) -> None:
    """Make the FakeEngines started on `model_dir` keep their loops busy (the file `fake-loop-load`)."""
    with open(os.path.join(model_dir, LOOP_LOAD), "w") as f:
        f.write(f"{period_ms} {busy_ms}")


def _read_loop_load(model_dir: str) -> tuple[float, float] | None:
    path = os.path.join(model_dir, LOOP_LOAD) if model_dir else ""
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        period_ms, busy_ms = (float(x) for x in f.read().split())
    return period_ms, busy_ms


def _claim(path: str) -> str | None:
    """The text of the file at `path` if this process took it (an atomic rename, so exactly one replica
    does), else None. The file is gone afterwards."""
    claimed = f"{path}.{os.getpid()}"
    try:
        os.rename(path, claimed)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with open(claimed) as f:
        text = f.read()
    os.unlink(claimed)
    return text
