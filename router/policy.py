"""Which worker serves a request: adapter affinity under a load bound. Pure: no I/O, no clock.

Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018) on
rendezvous hashing: each adapter has its own order of workers (highest
hash(adapter, worker) first), and a worker accepts a request only while its load
stays within ceil(c * (total load + 1) / n). A rare adapter therefore always lands
on its first worker (one copy, no cache thrash across the fleet); a hot one
overflows to its second, third... worker only while the first is over the bound,
so it spreads to as few workers as its load needs. Every router computes the
same order, so router replicas agree without talking to each other.

Within the bound: a worker that already has the adapter on the GPU (no load at
all), then one with a free adapter slot (load without evicting), then hash order.
Over the bound: least loaded first (running + waiting, then KV use). Requests for
the bare base model need no adapter: least loaded within the bound.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    address: str
    num_requests: int = 0               # running + waiting, incl. what this router sent since
    kv_used_frac: float = 0.0           # KV blocks used / total, 0..1
    gpu_adapters: frozenset[str] = frozenset()   # "name@version" or merge keys
    free_adapter_slots: int = 0
    is_known: bool = True               # False: no status yet (router just started): last resort


def adapter_name(key: str) -> str:
    """'name@3' -> 'name': versions of one adapter share a home (hash by name)."""
    return key.partition("@")[0]


def holds(worker: WorkerLoad, key: str) -> bool:
    """The worker has `key` on its GPU; a ref without a version matches any version."""
    if key in worker.gpu_adapters:
        return True
    return "@" not in key and any(adapter_name(k) == key for k in worker.gpu_adapters)


def _hash_rank(key: str, address: str) -> int:
    """Smaller is preferred (negated rendezvous weight)."""
    digest = hashlib.blake2b(f"{key}\0{address}".encode(), digest_size=8).digest()
    return -int.from_bytes(digest, "big")


def load_bound(workers: list[WorkerLoad], load_factor: float, min_bound: int = 1) -> int:
    """Most requests a worker may hold after taking this one: ceil(c * (total + 1) / n),
    but at least `min_bound`.

    At low load c x average is below 2, so a second concurrent request would already
    copy the adapter to another worker; a worker batches a few requests almost for
    free, so `min_bound` keeps them together. Always >= min load + 1 for c >= 1, so
    some worker is within the bound.
    """
    total = sum(w.num_requests for w in workers)
    return max(math.ceil(load_factor * (total + 1) / len(workers)), min_bound)


def rank(key: str | None, workers: list[WorkerLoad], load_factor: float = 1.25,
         min_bound: int = 1, salt: str = "") -> list[WorkerLoad]:
    """Workers best first. `key`: adapter ref or merge key, None for the base model.

    `salt` breaks ties between equally loaded workers for base-model requests
    (e.g. the request id), so idle workers share them.
    """
    known = [w for w in workers if w.is_known]
    unknown = [w for w in workers if not w.is_known]
    hash_key = adapter_name(key) if key else salt

    def by_load(w: WorkerLoad):
        return (w.num_requests, w.kv_used_frac, _hash_rank(hash_key, w.address))

    within: list[WorkerLoad] = []
    over: list[WorkerLoad] = []
    if known:
        bound = load_bound(known, load_factor, min_bound)
        for w in known:
            (within if w.num_requests + 1 <= bound else over).append(w)
    if key:
        within.sort(key=lambda w: (not holds(w, key), w.free_adapter_slots == 0,
                                   _hash_rank(hash_key, w.address)))
    else:
        within.sort(key=by_load)
    over.sort(key=by_load)
    unknown.sort(key=lambda w: _hash_rank(hash_key, w.address))
    return within + over + unknown
