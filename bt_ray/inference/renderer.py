"""PromptRenderer: chat messages -> prompt ids for an async engine, off its event loop.

In a vLLM replica one event loop runs Ray's calls and vLLM's output processing; rendering
each prompt there (0.5-1 ms for a DSPy prompt of 700 tokens) stalls both, once per request.
Here the requests that arrive in one turn of the loop are split into chunks of a few, and each
chunk is one `chat.prompt_ids_batch` call on a small thread pool, whose encode runs without the
GIL, as vLLM's AsyncMicrobatchTokenizer does for its own server. Chunks, not one batch per wave:
a request waits for its own chunk, not for the whole wave, and the chunks encode on several
cores at once. The ids are `prompt_ids`' exactly.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bt_ray.inference.batching import settle
from bt_ray.inference.chat import Messages, prompt_ids, prompt_ids_batch


class PromptRenderer:
    def __init__(self, tokenizer: Any, chunk: int = 4, threads: int | None = None):
        self.tokenizer = tokenizer
        self.chunk = chunk
        self.batches = 0  # rendering calls finished (tests read it)
        self._pending: list[tuple[Messages, asyncio.Future]] = []
        self._dispatch_on: asyncio.AbstractEventLoop | None = None  # the loop a dispatch is scheduled on
        threads = threads or min(4, _usable_cpus())
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="prompt-render")

    async def ids(self, messages: Messages) -> list[int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((messages, future))
        if self._dispatch_on is not loop:  # requests sent in the same turn of the loop share chunks
            self._dispatch_on = loop
            loop.call_soon(self._dispatch, loop)
        return await future

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._dispatch_on = None
        taken, self._pending = self._pending, []
        for start in range(0, len(taken), self.chunk):
            chunk = taken[start:start + self.chunk]
            try:
                done = loop.run_in_executor(self._threads, _render_batch, self.tokenizer, [m for m, _ in chunk])
            except RuntimeError as exc:  # the pool was closed: no request is left waiting
                for _, future in chunk:
                    settle(future, exc)
                continue
            done.add_done_callback(lambda finished, chunk=chunk: self._settle(chunk, finished))

    def _settle(self, chunk: list[tuple[Messages, asyncio.Future]], finished: asyncio.Future) -> None:
        if finished.cancelled():  # close() cancelled the queued call
            for _, future in chunk:
                future.cancel()  # no-op on one already done
            return
        self.batches += 1
        exc = finished.exception()
        results = [exc] * len(chunk) if exc is not None else finished.result()
        for (_, future), result in zip(chunk, results):
            settle(future, result)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one, as Linux does)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _render_batch(tokenizer: Any, conversations: list[Messages]) -> list[list[int] | Exception]:
    """One call for the chunk; if it fails, each conversation alone, so that a bad one fails only its request."""
    try:
        return prompt_ids_batch(tokenizer, conversations)
    except Exception:
        results: list[list[int] | Exception] = []
        for messages in conversations:
            try:
                results.append(prompt_ids(tokenizer, messages))
            except Exception as exc:
                results.append(exc)
        return results
