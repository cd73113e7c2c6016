"""TicketGate over an asynchronous slot pool: copies start ahead, admission waits for them."""
from __future__ import annotations

from inference_worker.adapter_gate import TicketGate
from inference_worker.interfaces import EngineRequest, SamplingConfig
from inference_worker.scheduler import AdapterState
from inference_worker.sequence import Sequence
from tests.engine.doubles import DirTicket
from tests.engine.test_slot_pool import adapter, make_pool


def _seq(key: str) -> Sequence:
    return Sequence(request=EngineRequest(key, [1, 2], SamplingConfig()), ticket=DirTicket(key, adapter(key, 4)),
                    generator=None)


def test_prefetch_then_admit_when_copied():
    pool, _ = make_pool(num_slots=4)
    pool.loads_async = True                          # as on CUDA; copies "finish" when listed
    done: set[str] = set()
    pool.is_loaded = lambda key: key in done and pool.slot_of(key) is not None
    gate = TicketGate(pool)
    seq = _seq("x")
    assert gate.state(seq) is AdapterState.PENDING
    assert pool.slot_of("x") is not None and not pool.policy.is_pinned("x") and pool.num_loads == 1
    assert gate.state(seq) is AdapterState.PENDING and pool.num_loads == 1     # loaded once
    done.add("x")
    assert gate.state(seq) is AdapterState.READY
    assert gate.acquire(seq) and pool.policy.is_pinned("x") and pool.num_loads == 1


def test_prefetch_is_capped_and_falls_back_to_a_plain_load():
    pool, _ = make_pool(num_slots=4)
    pool.loads_async = True
    pool.is_loaded = lambda key: False
    gate = TicketGate(pool)
    assert gate.max_prefetched == 1
    assert gate.state(_seq("x")) is AdapterState.PENDING
    y = _seq("y")
    assert gate.state(y) is AdapterState.READY and pool.slot_of("y") is None   # the scheduler loads it
    assert gate.acquire(y) and pool.slot_of("y") is not None
