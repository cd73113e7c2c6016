"""Test doubles for the engine: an AdapterSource over PEFT dirs, with tickets that can lag."""
from __future__ import annotations

import threading
from pathlib import Path

from inference_worker.adapter_weights import AdapterWeights, load_peft_dir
from services.errors import NotFound, OpenLoRAError


class DirTicket:
    """Ready after `delay_polls` calls of ready() (0 = at once); or failed with `error`."""

    def __init__(self, key: str, weights: AdapterWeights | None, delay_polls: int = 0,
                 error: OpenLoRAError | None = None) -> None:
        self.key = key
        self._weights, self._polls_left, self._error = weights, delay_polls, error
        self.num_polls = 0
        self._lock = threading.Lock()

    def ready(self) -> bool:
        with self._lock:
            self.num_polls += 1
            if self._error is not None:
                return False
            if self._polls_left > 0:
                self._polls_left -= 1
                return False
            return True

    def error(self) -> OpenLoRAError | None:
        return self._error

    def weights(self) -> AdapterWeights:
        assert self._weights is not None and self._polls_left == 0
        return self._weights

    def wait(self, timeout: float | None = None) -> bool:
        return self.ready()


class DirSource:
    """AdapterSource: ref -> PEFT directory, loaded with load_peft_dir (cached)."""

    def __init__(self, dirs: dict[str, Path], delays: dict[str, int] | None = None,
                 weights: dict[str, AdapterWeights] | None = None) -> None:
        self.dirs = {ref: Path(d) for ref, d in dirs.items()}
        self.delays = delays or {}
        self.tickets: list[DirTicket] = []
        self._cache: dict[str, AdapterWeights] = dict(weights or {})   # refs served as given

    def request(self, ref: str) -> DirTicket:
        if ref not in self.dirs and ref not in self._cache:
            ticket = DirTicket(ref, None, error=NotFound(f"adapter {ref} not found"))
        else:
            if ref not in self._cache:
                self._cache[ref] = load_peft_dir(self.dirs[ref], ref)
            ticket = DirTicket(ref, self._cache[ref], self.delays.get(ref, 0))
        self.tickets.append(ticket)
        return ticket

    def request_merge(self, spec) -> DirTicket:
        raise NotImplementedError

    def cpu_resident(self) -> list[str]:
        return list(self._cache)
