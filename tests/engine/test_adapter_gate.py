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
    """At the cap a sequence waits while a prefetched adapter is about to be taken: its copy in
    flight, or done within the last two scheduling passes (admitted, the sequence's step would
    wait for its copy behind that one). After that, with the prefetched sequences still not
    admitted (no room, or gone: waiting could be forever), the scheduler loads it."""
    pool, _ = make_pool(num_slots=4)
    pool.loads_async = True
    done: set[str] = set()
    pool.is_loaded = lambda key: key in done
    gate = TicketGate(pool)
    assert gate.max_prefetched == 1
    gate.begin_pass()
    assert gate.state(_seq("x")) is AdapterState.PENDING
    y = _seq("y")
    assert gate.state(y) is AdapterState.PENDING and pool.slot_of("y") is None   # x still copying
    done.add("x")                                     # x copied in the middle of a pass
    assert gate.state(y) is AdapterState.PENDING      # x's sequence gets its turn first
    gate.begin_pass()
    assert gate.state(y) is AdapterState.PENDING
    gate.begin_pass()                                 # two passes on, x is still not taken
    assert gate.state(y) is AdapterState.READY and pool.slot_of("y") is None   # the scheduler loads it
    assert gate.acquire(y) and pool.slot_of("y") is not None


def test_prefetch_cap_frees_when_a_prefetched_adapter_is_taken():
    pool, _ = make_pool(num_slots=4)
    pool.loads_async = True
    done: set[str] = set()
    pool.is_loaded = lambda key: key in done and pool.slot_of(key) is not None
    gate = TicketGate(pool)
    x, y = _seq("x"), _seq("y")
    assert gate.state(x) is AdapterState.PENDING and gate.state(y) is AdapterState.PENDING
    done.add("x")
    assert gate.state(x) is AdapterState.READY and gate.acquire(x)    # x admitted: the cap frees
    assert gate.state(y) is AdapterState.PENDING and pool.slot_of("y") is not None and pool.num_loads == 2
    done.add("y")
    assert gate.state(y) is AdapterState.READY


def test_a_failed_prefetched_copy_does_not_hold_others_back():
    pool, _ = make_pool(num_slots=4)
    pool.loads_async = True
    failed: set[str] = set()

    def is_loaded(key):
        if key in failed:
            raise RuntimeError("copy failed")
        return False
    pool.is_loaded = is_loaded
    gate = TicketGate(pool)
    x = _seq("x")
    gate.begin_pass()
    assert gate.state(x) is AdapterState.PENDING
    failed.add("x")                                   # x's copy fails before its sequence looks again
    assert gate.state(_seq("y")) is AdapterState.READY                  # nobody will take x: no wait for it
    assert gate.state(x) is AdapterState.FAILED and "copy" in str(x.error)
