"""CPU tier of the adapter tiers: adapter weights in host memory, bounded by bytes.

Eviction asks a small policy (touch / victim / remove) for the next victim among
the unpinned keys; the default is LRU. An entry is pinned while something uses it
(a live ticket, a merge in progress): it is never evicted then, even if the cache
goes over budget for a while — the bytes are referenced anyway, so the budget
reports the truth instead of pretending they were freed.
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import Protocol

from inference_worker.adapter_weights import AdapterWeights


class CachePolicy(Protocol):
    def touch(self, key: str) -> None: ...                      # key inserted or used
    def remove(self, key: str) -> None: ...                     # key left the cache
    def victim(self, candidates: set[str]) -> str | None: ...   # next to evict among candidates


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()   # oldest first

    def touch(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: set[str]) -> str | None:
        return next((key for key in self._order if key in candidates), None)


class AdapterCache:
    """Thread-safe key -> AdapterWeights with a bytes budget and pin counts."""

    def __init__(self, budget_bytes: int, policy: CachePolicy | None = None):
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._policy = policy or LRUPolicy()
        self._entries: dict[str, AdapterWeights] = {}
        self._pins: Counter[str] = Counter()
        self._nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> AdapterWeights | None:
        with self._lock:
            weights = self._entries.get(key)
            if weights is not None:
                self._policy.touch(key)
            return weights

    def put(self, key: str, weights: AdapterWeights) -> list[str]:
        """Insert (or replace) and evict unpinned victims until within budget. Returns evicted keys.

        An entry larger than the whole budget is still inserted: its caller holds it
        now; it is the first victim once unpinned.
        """
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            self._entries[key] = weights
            self._nbytes += weights.nbytes
            self._policy.touch(key)
            return self._evict_locked(protect=key)

    def pin(self, key: str) -> None:
        """Keep `key` (present or about to be put) from eviction until unpin()."""
        with self._lock:
            self._pins[key] += 1

    def unpin(self, key: str) -> None:
        with self._lock:
            if self._pins[key] <= 1:
                del self._pins[key]
                self._evict_locked()
            else:
                self._pins[key] -= 1

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            return self._pins[key] > 0

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def _evict_locked(self, protect: str | None = None) -> list[str]:
        evicted = []
        while self._nbytes > self.budget_bytes:
            candidates = {k for k in self._entries if self._pins[k] <= 0 and k != protect}
            key = self._policy.victim(candidates)
            if key is None:
                break
            self._nbytes -= self._entries.pop(key).nbytes
            self._policy.remove(key)
            evicted.append(key)
        return evicted
