"""LRU policy and the device slot pool: pinning, victim choice, layout of loaded adapters, LoRA math."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from inference_worker.adapter_weights import AdapterWeights
from inference_worker.lora.layers import LoRALinear
from inference_worker.lora.metadata import LoraBatchMeta, segments_of
from inference_worker.lora.policy import LRUPolicy
from inference_worker.lora.slot_pool import SlotPool
from inference_worker.lora.staged_load import TableStaging
from kernels.backend import get_ops
from services.errors import FailedPrecondition

HIDDEN, KV = 8, 4


def test_lru_victim_skips_pinned_and_follows_use():
    lru = LRUPolicy()
    for key in ("a", "b", "c"):
        lru.touch(key)
    assert lru.victim() == "a"
    lru.touch("a")
    assert lru.victim() == "b"
    lru.pin("b")
    lru.pin("b")
    assert lru.victim() == "c"
    lru.pin("c")
    lru.pin("a")
    assert lru.victim() is None
    lru.unpin("b")
    assert lru.victim() is None and lru.is_pinned("b")   # pins nest
    lru.unpin("b")
    assert lru.victim() == "b"
    lru.remove("b")
    assert lru.victim() is None
    with pytest.raises(ValueError):
        lru.unpin("b")


def make_layers(num_layers=2):
    ops = get_ops("cpu")
    torch.manual_seed(0)
    layers = []
    for i in range(num_layers):
        layers.append((i, LoRALinear(nn.Linear(HIDDEN, HIDDEN + 2 * KV), ("q_proj", "k_proj", "v_proj"),
                                     (HIDDEN, KV, KV), ops)))
        layers.append((i, LoRALinear(nn.Linear(HIDDEN, HIDDEN), ("o_proj",), (HIDDEN,), ops)))
    return layers


def adapter(key, rank, modules=("q_proj", "v_proj", "o_proj"), scaling=2.0, seed=0, num_layers=2):
    gen = torch.Generator().manual_seed(seed)
    out = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN}
    return AdapterWeights(key, "m", rank, scaling, {
        (layer, m): (torch.randn(rank, HIDDEN, generator=gen), torch.randn(out[m], rank, generator=gen))
        for layer in range(num_layers) for m in modules})


def make_pool(num_slots=2, max_rank=8, load_thread=False):
    layers = make_layers()
    return SlotPool(layers, num_slots, max_rank, max_tokens=16, device=torch.device("cpu"),
                    dtype=torch.float32, load_thread=load_thread), layers


def test_load_layout_zero_padding_and_missing_modules():
    pool, layers = make_pool()
    w = adapter("x", rank=4, modules=("k_proj", "o_proj"), scaling=0.5)
    slot = pool.acquire("x", lambda: w)
    qkv, o = layers[0][1], layers[1][1]
    a, b = w.modules[(0, "k_proj")]
    assert torch.equal(qkv.a_pool[slot, 1, :4], a) and not qkv.a_pool[slot, 1, 4:].any()
    # B is rank-major [S, R, N]: the adapter's rows 0..3 hold Bᵀ, padding rank rows stay zero
    assert torch.equal(qkv.b_pool[slot, :4, HIDDEN:HIDDEN + KV], b.t()) and not qkv.b_pool[slot, 4:].any()
    assert not qkv.a_pool[slot, 0].any() and not qkv.a_pool[slot, 2].any()      # q, v absent: zero
    assert torch.equal(o.a_pool[slot, 0, :4], w.modules[(0, "o_proj")][0])
    assert pool.slot_ranks[slot] == 4 and pool.slot_scales[slot] == 0.5
    # a later adapter in the same slot leaves nothing of the old one behind
    pool.release("x")
    pool.evict_if_idle("x")
    w2 = adapter("y", rank=2, modules=("q_proj",))
    assert pool.acquire("y", lambda: w2) == slot
    assert not qkv.a_pool[slot, 1].any() and not o.a_pool[slot].any()


def test_pins_eviction_and_full_pool():
    pool, _ = make_pool(num_slots=2)
    loads = []

    def weights(key):
        return lambda: loads.append(key) or adapter(key, 2)

    sa = pool.acquire("a", weights("a"))
    pool.acquire("b", weights("b"))
    assert pool.acquire("a", weights("a")) == sa and loads == ["a", "b"]   # resident: no reload
    assert pool.acquire("c", weights("c")) is None                           # all pinned
    assert pool.num_unpinned() == 0
    pool.release("a")
    pool.release("a")
    assert pool.num_unpinned() == 1
    assert pool.acquire("c", weights("c")) == sa                             # a was the victim
    assert pool.slot_of("a") is None and pool.num_evictions == 1
    pool.release("b")
    pool.release("c")
    pool.acquire("b", weights("b"))                                          # b most recent
    pool.release("b")
    assert pool.acquire("a", weights("a")) == sa                             # c (LRU) evicted
    assert sorted(pool.resident()) == ["a", "b"] and loads == ["a", "b", "c", "a"]


def test_shape_checks_fail_without_evicting():
    pool, _ = make_pool(num_slots=1, max_rank=8)
    pool.acquire("ok", lambda: adapter("ok", 2))
    pool.release("ok")
    bad_in = adapter("bad", 2)
    bad_in.modules[(0, "q_proj")] = (torch.zeros(2, HIDDEN + 1), torch.zeros(HIDDEN, 2))
    for bad in (bad_in, adapter("big", 16), adapter("deep", 2, num_layers=3),
                AdapterWeights("mlp", "m", 2, 1.0, {(0, "gate_proj"): (torch.zeros(2, HIDDEN), torch.zeros(4, 2))})):
        with pytest.raises(FailedPrecondition):
            pool.acquire(bad.key, lambda bad=bad: bad)
    assert pool.resident() == ["ok"] and pool.num_evictions == 0


def test_lora_linear_matches_dense_math():
    """Mixed slots of different ranks and base tokens in one step, as segments."""
    pool, layers = make_pool(num_slots=2, max_rank=8)
    wa, wb = adapter("a", 3, scaling=0.5, seed=1), adapter("b", 8, scaling=2.0, seed=2)
    slots = {"a": pool.acquire("a", lambda: wa), "b": pool.acquire("b", lambda: wb), "": -1}
    order = ["", "", "b", "a", "a", "b"]                # sequences of 1-2 tokens, grouped by slot runs
    lens = [2, 1, 2, 1, 2, 1]
    indptr, seg_slots = segments_of([slots[k] for k in order], lens)
    meta = LoraBatchMeta(True, torch.tensor(indptr, dtype=torch.int32), torch.tensor(seg_slots, dtype=torch.int32),
                         pool.slot_ranks, pool.slot_scales)
    x = torch.randn(sum(lens), HIDDEN)
    qkv = layers[0][1]
    out = qkv(x, meta)
    token_adapter = [k for k, n in zip(order, lens) for _ in range(n)]
    for t, key in enumerate(token_adapter):
        expected = qkv.base_layer(x[t])
        if key:
            w = {"a": wa, "b": wb}[key]
            for m, (lo, hi) in (("q_proj", (0, HIDDEN)), ("v_proj", (HIDDEN + KV, HIDDEN + 2 * KV))):
                a, b = w.modules[(0, m)]
                expected[lo:hi] += w.scaling * (b @ (a @ x[t]))
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


def test_reload_zeroes_only_rows_it_does_not_overwrite():
    """A slot is zeroed before a load unless the new adapter overwrites every row the last one
    wrote (all modules, rank >= the last rank); the pool then equals a fresh pool's."""
    every = ("q_proj", "k_proj", "v_proj", "o_proj")
    pool, layers = make_pool(num_slots=1)
    fresh_pool, fresh_layers = make_pool(num_slots=1)
    for w in [adapter("r8", 8, every, seed=1), adapter("r4", 4, every, seed=2),
              adapter("r6", 6, every, seed=3), adapter("sub", 8, ("o_proj",), seed=4)]:
        pool.acquire(w.key, lambda w=w: w)
        pool.release(w.key)
        fresh_pool.acquire(w.key, lambda w=w: w)
        fresh_pool.release(w.key)
        for (_, lin), (_, ref) in zip(layers, fresh_layers):
            torch.testing.assert_close(lin.a_pool, ref.a_pool, rtol=0, atol=0)
            torch.testing.assert_close(lin.b_pool, ref.b_pool, rtol=0, atol=0)
        fresh_pool, fresh_layers = make_pool(num_slots=1)      # next comparison: a never-used pool


def test_loader_thread_loads_in_background_and_steps_wait_for_their_slots():
    import threading

    pool, layers = make_pool(num_slots=2, load_thread=True)
    qkv = layers[0][1]
    try:
        gate = threading.Event()
        pool._loader.submit(gate.wait)                      # hold the loader: the load stays queued
        w = adapter("x", rank=4)
        slot = pool.acquire("x", lambda: w)                 # returns at once
        assert pool.loads_in_background and not pool.is_loaded("x")
        assert not qkv.a_pool[slot].any()                   # not copied yet
        pool.wait_for_loads({1 - slot})                     # another slot: no wait
        assert pool.num_step_waits == 0
        threading.Timer(0.2, gate.set).start()
        pool.wait_for_loads({slot})                         # a step reading the slot waits for its load
        assert pool.num_step_waits == 1                     # and is counted (bench/engine.py reports it)
        assert torch.equal(qkv.a_pool[slot, 0, :4], w.modules[(0, "q_proj")][0])
        assert pool.is_loaded("x") and pool.slot_ranks[slot] == 4
    finally:
        pool.close()


def test_settle_waits_for_the_loader_thread():
    import threading

    pool, _ = make_pool(num_slots=1, load_thread=True)
    try:
        gate = threading.Event()
        pool._loader.submit(gate.wait)                      # hold the loader: the load stays queued
        pool.acquire("x", lambda: adapter("x", rank=4))
        assert not pool.is_loaded("x")
        threading.Timer(0.2, gate.set).start()
        pool.settle()
        assert pool.is_loaded("x")
    finally:
        pool.close()


def test_failed_background_load_frees_its_slot_and_raises():
    pool, _ = make_pool(num_slots=1, load_thread=True)
    try:
        bad = adapter("bad", rank=2)
        a, b = bad.modules[(0, "q_proj")]
        bad.modules[(0, "q_proj")] = (a.to("meta"), b)        # passes the shape checks, fails to copy
        pool.acquire("bad", lambda: bad)
        pool._loader.submit(lambda: None).result()          # the load has run
        with pytest.raises(NotImplementedError, match="meta"):
            pool.is_loaded("bad")
        assert pool.resident() == [] and pool.num_unpinned() == 1
        good = adapter("good", rank=2)
        slot = pool.acquire("good", lambda: good)
        pool.wait_for_loads({slot})
        assert pool.is_loaded("good")
    finally:
        pool.close()


class _FakeEvent:
    """Stands for a CUDA event: records what the staging asks of it."""

    log: list = []

    def record(self) -> None:
        self.log.append(("record", id(self)))

    def synchronize(self) -> None:
        self.log.append(("wait", id(self)))


def test_table_staging_reuses_a_buffer_only_after_its_copy():
    """A ring of host buffers: each upload copies its tables out (later uploads cannot change
    them), and a buffer is written again only after waiting on the event of the copy from it."""
    _FakeEvent.log = []
    staging = TableStaging(max_ints=6, device=torch.device("cpu"), depth=2, event_factory=_FakeEvent)
    first, second = staging.upload([1, 2, 3]), staging.upload([4, 5])
    assert [op for op, _ in _FakeEvent.log] == ["record", "record"]          # no waits while buffers are fresh
    third = staging.upload([7, 8, 9, 10, 11, 12])                            # buffer 0 again
    assert _FakeEvent.log[2] == ("wait", _FakeEvent.log[0][1]) and _FakeEvent.log[3][0] == "record"
    assert first.tolist() == [1, 2, 3] and second.tolist() == [4, 5] and third.tolist() == [7, 8, 9, 10, 11, 12]
    with pytest.raises(ValueError, match="table entries"):
        staging.upload(list(range(7)))
