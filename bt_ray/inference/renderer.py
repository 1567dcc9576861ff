"""PromptRenderer: chat messages -> prompt ids for an async engine, off its event loop.

In a vLLM replica one event loop runs Ray's calls and vLLM's output processing; rendering
each prompt there (0.5-1 ms for a DSPy prompt of 700 tokens) stalls both, once per request.
Here the requests that arrive while a batch is being rendered wait for the next one, and each
batch is one `chat.prompt_ids_batch` call on a worker thread, whose encode runs without the GIL,
as vLLM's AsyncMicrobatchTokenizer does for its own server. The ids are `prompt_ids`' exactly.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bt_ray.inference.batching import settle
from bt_ray.inference.chat import Messages, prompt_ids, prompt_ids_batch


class PromptRenderer:
    def __init__(self, tokenizer: Any, max_batch: int = 256):
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.batches = 0  # rendering calls made (tests read it)
        self._pending: list[tuple[Messages, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="prompt-render")

    async def ids(self, messages: Messages) -> list[int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((messages, future))
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._worker = loop.create_task(self._render())
        return await future

    async def _render(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)  # requests sent in the same turn of the loop join the first batch
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            try:
                results = await loop.run_in_executor(self._thread, _render_batch, self.tokenizer,
                                                     [messages for messages, _ in batch])
            except BaseException as exc:  # cancelled, or the thread is gone: no request is left waiting
                for _, future in batch + self._pending:
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()  # no-op on one already done
                    else:
                        settle(future, exc)
                self._pending = []
                raise
            self.batches += 1
            for (_, future), result in zip(batch, results):
                settle(future, result)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _render_batch(tokenizer: Any, conversations: list[Messages]) -> list[list[int] | Exception]:
    """One call for the batch; if it fails, each conversation alone, so that a bad one fails only its request."""
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
