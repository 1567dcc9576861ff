"""An LRU cache of prompt-prefix KV states, bounded by the number of prefix tokens held.

DSPy calls of one candidate program share their instructions and demos (700-1100
tokens) and differ only in a short last message. The transformers engine computes
that shared prefix once per (adapter, prefix ids) and keeps its KV here. Values are
opaque to this class: it only does the LRU bookkeeping, so it is tested without a model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

PrefixKey = tuple[str | None, tuple[int, ...]]  # (adapter name or None for base, prefix token ids)


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # key -> (value, tokens)
        self.tokens = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> Any | None:
        """The value for `key` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: Any, tokens: int) -> bool:
        """Insert, evicting least recently used entries until it fits. False if it can never fit."""
        if tokens > self.max_tokens:
            return False
        self._remove(key)
        while self.tokens + tokens > self.max_tokens:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evictions += 1
        self._entries[key] = (value, tokens)
        self.tokens += tokens
        return True

    def evict_adapter(self, adapter: str | None) -> int:
        """Drop every entry computed with `adapter` (its weights are gone). Returns how many."""
        stale = [key for key in self._entries if key[0] == adapter]
        for key in stale:
            self._remove(key)
        return len(stale)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "tokens": self.tokens, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.tokens -= entry[1]
