"""The scheduler's view of adapters: ticket state, and device slots pinned per running sequence."""
from __future__ import annotations

import time

from inference_worker.lora.slot_pool import SlotPool
from inference_worker.scheduler import AdapterState
from inference_worker.sequence import Sequence
from services.errors import OpenLoRAError

_NEVER_TAKEN = -(1 << 62)          # a prefetched adapter whose copy failed: "seen done" long ago


class TicketGate:
    """AdapterGate over AdapterTickets (CPU tiers) and the device SlotPool."""

    def __init__(self, slot_pool: SlotPool) -> None:
        self.slot_pool = slot_pool
        # loaded ahead, not yet acquired by a sequence -> the pass its copy was first seen done
        # (None while in flight)
        self._prefetched: dict[str, int | None] = {}
        self.max_prefetched = max(1, slot_pool.num_slots // 4)
        self._pass = 0

    def begin_pass(self) -> None:
        self._pass += 1

    def state(self, seq: Sequence) -> AdapterState:
        if seq.ticket is None:
            return AdapterState.READY
        error = seq.ticket.error()
        if error is not None:
            seq.error = error
            return AdapterState.FAILED
        if not seq.ticket.ready():
            return AdapterState.PENDING
        if self.slot_pool.loads_in_background:
            return self._prefetch(seq)
        return AdapterState.READY

    def _prefetch(self, seq: Sequence) -> AdapterState:
        """Async slot pool: start the copy into a slot (resident, unpinned) and report PENDING
        until it is done, so the step that admits the sequence never waits for it.

        At most `max_prefetched` adapters are prefetched and not yet taken (unpinned, more could
        evict each other forever; unpinned, they never hold a slot another sequence needs). At
        that cap the sequence stays PENDING while one of them is about to be taken
        (`_expecting`): that sequence, admitted, frees a place. Admitting it instead made the
        step wait for a copy queued behind the others' (H200, S1000: one step of ~250 ms in each
        run). READY (the scheduler then loads it in acquire, and the step waits for the copy on
        the device) when no slot can take it now, or at the cap when no prefetched adapter is
        about to be taken (their sequences wait for room in the batch, or are gone: waiting for
        them could be forever).
        """
        key = seq.ticket.key
        pool = self.slot_pool
        for k in [k for k in self._prefetched if pool.slot_of(k) is None]:
            del self._prefetched[k]                  # evicted before it was used
        if pool.slot_of(key) is None:
            if len(self._prefetched) >= self.max_prefetched:
                return AdapterState.PENDING if self._expecting() else AdapterState.READY
            try:
                if self.slot_pool.acquire(key, seq.ticket.weights) is None:
                    return AdapterState.READY
            except OpenLoRAError as exc:
                seq.error = exc
                return AdapterState.FAILED
            self.slot_pool.release(key)
            self._prefetched[key] = None
        try:
            loaded = self.slot_pool.is_loaded(key)
        except Exception as exc:  # noqa: BLE001 - a failed copy: this request fails, not the step
            self._prefetched.pop(key, None)
            seq.error = OpenLoRAError(f"adapter {key}: copying it into a device slot failed: {exc}")
            return AdapterState.FAILED
        return AdapterState.READY if loaded else AdapterState.PENDING

    def _expecting(self) -> bool:
        """Whether a prefetched adapter is about to be taken: its copy is in flight, or was first
        seen done in this scheduling pass or the one before (its sequence has its turn to be
        admitted in this pass or the next). A failed copy is never taken. Each copy is polled
        until seen done."""
        for key, seen in self._prefetched.items():
            if seen is None:
                try:
                    if not self.slot_pool.is_loaded(key):
                        return True
                    seen = self._pass
                except Exception:  # noqa: BLE001 - a failed copy: its sequence fails, nobody takes it
                    seen = _NEVER_TAKEN
                self._prefetched[key] = seen
            if seen >= self._pass - 1:
                return True
        return False

    def acquire(self, seq: Sequence) -> bool:
        if seq.ticket is None:
            return True
        key = seq.ticket.key
        self._prefetched.pop(key, None)
        try:
            slot = self.slot_pool.acquire(key, seq.ticket.weights)
        except OpenLoRAError as exc:           # FailedPrecondition: does not fit this model
            seq.error = exc
            return False
        if slot is None:
            return False
        seq.slot, seq.adapter_key = slot, key
        if seq.adapter_ready_at is None:
            seq.adapter_ready_at = time.monotonic()
        return True

    def release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.slot_pool.release(seq.adapter_key)
            seq.slot = -1
