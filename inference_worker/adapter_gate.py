"""The scheduler's view of adapters: ticket state, and device slots pinned per running sequence."""
from __future__ import annotations

import time

from inference_worker.lora.slot_pool import SlotPool
from inference_worker.scheduler import AdapterState
from inference_worker.sequence import Sequence
from services.errors import OpenLoRAError


class TicketGate:
    """AdapterGate over AdapterTickets (CPU tiers) and the device SlotPool."""

    def __init__(self, slot_pool: SlotPool) -> None:
        self.slot_pool = slot_pool

    def state(self, seq: Sequence) -> AdapterState:
        if seq.ticket is None:
            return AdapterState.READY
        error = seq.ticket.error()
        if error is not None:
            seq.error = error
            return AdapterState.FAILED
        return AdapterState.READY if seq.ticket.ready() else AdapterState.PENDING

    def acquire(self, seq: Sequence) -> bool:
        if seq.ticket is None:
            return True
        key = seq.ticket.key
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
