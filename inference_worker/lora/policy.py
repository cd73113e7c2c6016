"""Which resident adapter leaves a full slot pool: a small policy interface and its LRU.

The pool calls touch() when a slot is used, pin()/unpin() as running requests (or
an explicit LoadAdapter) start and stop using it, and victim() for the key to evict.
A pinned key is never a victim.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class CachePolicy(Protocol):
    def touch(self, key: str) -> None: ...          # used now (adds the key if new)

    def pin(self, key: str) -> None: ...            # one more user; pins nest

    def unpin(self, key: str) -> None: ...

    def is_pinned(self, key: str) -> bool: ...

    def victim(self) -> str | None: ...             # key to evict, None when every key is pinned

    def remove(self, key: str) -> None: ...         # forget the key (evicted)


class LRUPolicy:
    """Least recently used unpinned key first."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()   # oldest first
        self._pins: dict[str, int] = {}

    def touch(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def pin(self, key: str) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        count = self._pins.get(key, 0)
        if count <= 0:
            raise ValueError(f"unpin of {key!r} that is not pinned")
        if count == 1:
            del self._pins[key]
        else:
            self._pins[key] = count - 1

    def is_pinned(self, key: str) -> bool:
        return key in self._pins

    def victim(self) -> str | None:
        return next((key for key in self._order if key not in self._pins), None)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)
        self._pins.pop(key, None)
