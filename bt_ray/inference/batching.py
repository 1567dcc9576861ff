"""The request queue of a batching engine: which waiting requests run together.

A batch runs with one adapter (LoRA weights are switched per forward pass, not per
row). Within that adapter, requests with the same prompt prefix (all messages but
the last: instructions + demos of one DSPy program) are taken together, so they
share one prefix KV and pad little. Oldest first everywhere, so nothing starves.
Between decode steps, requests for the running batch's adapter join it (`joiners`).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Hashable

from bt_ray.inference.engine import GenerationRequest

_arrival = itertools.count()


def prefix_group(request: GenerationRequest) -> Hashable:
    """Requests with equal groups render to the same prompt prefix (cheap: no tokenizer)."""
    return repr([sorted(message.items()) for message in request.messages[:-1]])


def settle(future: Any, outcome: Any) -> None:
    """Resolve a caller's asyncio future with a result or an exception, unless the caller went away.
    Runs on the future's event loop."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass
class Pending:
    """A request waiting for its batch, and the future its caller awaits."""

    request: GenerationRequest
    future: Any  # asyncio.Future; only .done() is used here
    group: Hashable = field(init=False)
    order: int = field(init=False, default_factory=lambda: next(_arrival))

    def __post_init__(self) -> None:
        self.group = prefix_group(self.request)


class RequestQueue:
    """Thread-safe: the event loop puts requests in, the torch thread takes them out."""

    def __init__(self) -> None:
        self._items: list[Pending] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def put(self, item: Pending) -> None:
        with self._lock:
            self._items.append(item)

    def next_batch(self, max_size: int) -> list[Pending]:
        """Up to `max_size` requests for the oldest request's adapter, whole prefix groups first.

        Requests whose caller has gone away (future done, e.g. cancelled) are dropped.
        """
        with self._lock:
            self._items = [item for item in self._items if not item.future.done()]
            return self._take(self._items[0].request.adapter, max_size) if self._items else []

    def joiners(self, adapter: str | None, max_size: int) -> list[Pending]:
        """Up to `max_size` requests for `adapter` to join its running batch.

        None while a request for another adapter waits: the running batch then drains,
        and the next batch starts with the oldest request, so that one does not starve.
        """
        with self._lock:
            self._items = [item for item in self._items if not item.future.done()]
            if max_size < 1 or any(item.request.adapter != adapter for item in self._items):
                return []
            return self._take(adapter, max_size)

    def _take(self, adapter: str | None, max_size: int) -> list[Pending]:
        same_adapter = [item for item in self._items if item.request.adapter == adapter]
        # Rank each prefix group by its oldest request; keep arrival order inside a group.
        group_rank: dict[Hashable, int] = {}
        for item in same_adapter:
            group_rank.setdefault(item.group, len(group_rank))
        same_adapter.sort(key=lambda item: (group_rank[item.group], item.order))
        batch = same_adapter[:max_size]
        taken = {id(item) for item in batch}
        self._items = [item for item in self._items if id(item) not in taken]
        return batch
