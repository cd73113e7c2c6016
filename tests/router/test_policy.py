"""router/policy.py: affinity first, bounded load, hashing that keeps rare adapters in one place."""
from __future__ import annotations

from collections import Counter

import pytest

from router.policy import WorkerLoad, holds, load_bound, rank

ADDRS = [f"10.0.0.{i}:50053" for i in range(1, 5)]


def idle(**kw) -> list[WorkerLoad]:
    return [WorkerLoad(a, free_adapter_slots=4, **kw) for a in ADDRS]


def with_load(workers, loads: dict[str, int]) -> list[WorkerLoad]:
    return [WorkerLoad(w.address, num_requests=loads.get(w.address, w.num_requests), kv_used_frac=w.kv_used_frac,
                       gpu_adapters=w.gpu_adapters, free_adapter_slots=w.free_adapter_slots) for w in workers]


def test_empty_gives_nothing():
    assert rank("a", []) == [] and rank(None, []) == []


def test_same_adapter_same_worker_and_adapters_spread_over_the_fleet():
    homes = {rank(f"adapter-{i}", idle())[0].address for i in range(200)}
    assert rank("adapter-7", idle())[0] == rank("adapter-7", list(reversed(idle())))[0]  # order-free
    assert homes == set(ADDRS)                                                     # every worker is someone's home


def test_versions_share_a_home_and_gpu_residency_matches_any_version():
    assert rank("legal@2", idle())[0].address == rank("legal", idle())[0].address
    w = WorkerLoad("x:1", gpu_adapters=frozenset({"legal@3"}))
    assert holds(w, "legal") and holds(w, "legal@3") and not holds(w, "legal@2") and not holds(w, "leg")


def test_gpu_resident_beats_free_slot_beats_hash_order():
    home = rank("a", idle())[0].address
    other = next(a for a in ADDRS if a != home)
    workers = [WorkerLoad(a, free_adapter_slots=0 if a == home else 1,
                          gpu_adapters=frozenset({"a@1"}) if a == other else frozenset()) for a in ADDRS]
    assert rank("a", workers)[0].address == other                         # on GPU
    no_gpu = [WorkerLoad(a, free_adapter_slots=0 if a == home else 1) for a in ADDRS]
    assert rank("a", no_gpu)[0].address != home                           # free slot over hash home
    full = [WorkerLoad(a) for a in ADDRS]
    assert rank("a", full)[0].address == home                             # nothing free: hash home


def test_load_bound_is_c_times_average_and_someone_fits():
    ws = [WorkerLoad("a", num_requests=3), WorkerLoad("b", num_requests=1)]
    assert load_bound(ws, 1.25) == 4                                       # ceil(1.25 * 5 / 2)
    assert load_bound(ws, 1.25, min_bound=6) == 6
    for loads in ([0, 0], [7, 0], [5, 5], [100, 99]):
        ws = [WorkerLoad(str(i), num_requests=n) for i, n in enumerate(loads)]
        assert min(loads) + 1 <= load_bound(ws, 1.0)


def test_overloaded_home_overflows_to_next_in_hash_order():
    order = [w.address for w in rank("hot", idle())]
    busy = with_load(idle(gpu_adapters=frozenset()), {order[0]: 10})
    assert rank("hot", busy)[0].address == order[1]
    # home is on the GPU but over the bound: still skipped
    gpu = [WorkerLoad(a, num_requests=10 if a == order[0] else 0, free_adapter_slots=4,
                      gpu_adapters=frozenset({"hot@1"}) if a == order[0] else frozenset()) for a in ADDRS]
    assert rank("hot", gpu)[0].address == order[1]
    # over-bound workers come last, least loaded first, for retries
    assert [w.address for w in rank("hot", busy)][-1] == order[0]


def simulate(requests: list[str], workers: int = 4, c: float = 1.25, min_bound: int = 1) -> dict[str, Counter]:
    """Concurrent requests arriving one by one (none finishes): who takes each adapter."""
    loads = {a: 0 for a in ADDRS[:workers]}
    gpu: dict[str, set[str]] = {a: set() for a in loads}
    placed: dict[str, Counter] = {}
    for adapter in requests:
        ws = [WorkerLoad(a, num_requests=loads[a], free_adapter_slots=4, gpu_adapters=frozenset(gpu[a]))
              for a in loads]
        chosen = rank(adapter, ws, c, min_bound)[0].address
        loads[chosen] += 1
        gpu[chosen].add(adapter + "@1")
        placed.setdefault(adapter, Counter())[chosen] += 1
    return placed


def test_hot_adapter_spreads_to_a_few_cold_ones_stay_on_one():
    requests = ["hot"] * 40 + [f"cold-{i % 8}" for i in range(16)]
    placed = simulate(requests)
    assert len(placed["hot"]) >= 2                                         # spread...
    for i in range(8):
        assert len(placed[f"cold-{i}"]) == 1                               # ...rare ones not
    assert len(simulate(["hot"] * 2)["hot"]) == 2                          # c x average < 2: pure bound spreads
    assert len(simulate(["hot"] * 4, min_bound=4)["hot"]) == 1             # a floor keeps a few together
    assert len(simulate(["hot"] * 40, min_bound=4)["hot"]) >= 2


def test_bound_holds_under_skew():
    placed = simulate(["hot"] * 100, c=1.25)
    per_worker = placed["hot"]
    assert max(per_worker.values()) <= 1.25 * 100 / 4 + 1


def test_base_model_goes_to_least_loaded_and_salt_breaks_ties():
    ws = [WorkerLoad("a", num_requests=2), WorkerLoad("b", num_requests=0), WorkerLoad("c", num_requests=1)]
    assert [w.address for w in rank(None, ws)] == ["b", "c", "a"]
    kv = [WorkerLoad("a", kv_used_frac=0.9), WorkerLoad("b", kv_used_frac=0.1)]
    assert rank(None, kv)[0].address == "b"
    firsts = {rank(None, [WorkerLoad("a"), WorkerLoad("b")], salt=str(i))[0].address for i in range(50)}
    assert firsts == {"a", "b"}


def test_unknown_workers_are_a_last_resort():
    ws = [WorkerLoad("new", is_known=False), WorkerLoad("old", num_requests=50)]
    assert [w.address for w in rank("a", ws)] == ["old", "new"]
    assert rank(None, [WorkerLoad("new", is_known=False)])[0].address == "new"


@pytest.mark.parametrize("c", [1.0, 1.25, 2.0])
def test_bounded_loads_balance_many_adapters(c):
    requests = [f"ad-{i % 50}" for i in range(400)]
    per_worker = Counter()
    for counter in simulate(requests, c=c).values():
        per_worker.update(counter)
    assert max(per_worker.values()) <= c * 400 / 4 + 1
