"""Which replica serves a request: fewest outstanding requests, sticky by prompt prefix.

Plain class, no Ray: the pool calls `pick` before sending and `done` after the
answer (or failure) comes back. Stickiness keeps requests that share a prefix
(one candidate program's instructions + demos) on the replica that already holds
that prefix's KV cache, unless it is clearly busier than the least-loaded one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class Router:
    def __init__(self, replica_ids: list[str], sticky_slack: int = 4, max_prefixes: int = 4096):
        if not replica_ids:
            raise ValueError("a router needs at least one replica")
        self.outstanding: dict[str, int] = {rid: 0 for rid in replica_ids}
        self.sticky_slack = sticky_slack
        self._home: OrderedDict[str, str] = OrderedDict()  # prefix key -> replica id
        self._max_prefixes = max_prefixes
        self._lock = threading.Lock()

    def pick(self, prefix_key: str | None = None) -> str:
        """Choose a replica and count the request as outstanding on it."""
        with self._lock:
            if not self.outstanding:
                raise LookupError("no replica to route to (all were removed)")
            least = min(self.outstanding, key=lambda rid: (self.outstanding[rid], rid))
            chosen = least
            home = self._home.get(prefix_key) if prefix_key else None
            if home in self.outstanding and self.outstanding[home] <= self.outstanding[least] + self.sticky_slack:
                chosen = home
            if prefix_key:
                self._home[prefix_key] = chosen
                self._home.move_to_end(prefix_key)
                while len(self._home) > self._max_prefixes:
                    self._home.popitem(last=False)
            self.outstanding[chosen] += 1
            return chosen

    def done(self, replica_id: str) -> None:
        with self._lock:
            if replica_id in self.outstanding and self.outstanding[replica_id] > 0:
                self.outstanding[replica_id] -= 1

    def add(self, replica_id: str) -> None:
        with self._lock:
            self.outstanding.setdefault(replica_id, 0)

    def remove(self, replica_id: str) -> None:
        with self._lock:
            self.outstanding.pop(replica_id, None)
            for key in [k for k, rid in self._home.items() if rid == replica_id]:
                del self._home[key]

    def load(self) -> dict[str, int]:
        with self._lock:
            return dict(self.outstanding)
