"""CPU tier: LRU by bytes, pins keep entries, policy behind touch/victim/remove."""
from __future__ import annotations

import pytest
import torch

from inference_worker.adapter_cache import AdapterCache, LRUPolicy
from inference_worker.adapter_weights import AdapterWeights


def weights(key: str, nbytes: int) -> AdapterWeights:
    # one module, A [1, n/2] and B [n/2, 1] in uint8 -> n bytes (n even)
    n = nbytes // 2
    a, b = torch.zeros(1, n, dtype=torch.uint8), torch.zeros(n, 1, dtype=torch.uint8)
    return AdapterWeights(key, "base", 1, 1.0, {(0, "q_proj"): (a, b)})


def test_lru_by_bytes():
    cache = AdapterCache(budget_bytes=300)
    for key in "abc":
        assert cache.put(key, weights(key, 100)) == []
    assert cache.nbytes == 300
    cache.get("a")                                   # a is now the most recent
    assert cache.put("d", weights("d", 100)) == ["b"]
    assert cache.put("e", weights("e", 200)) == ["c", "a"]
    assert sorted(cache.keys()) == ["d", "e"] and cache.nbytes == 300
    assert cache.get("b") is None


def test_replace_same_key_counts_once():
    cache = AdapterCache(budget_bytes=1000)
    cache.put("a", weights("a", 100))
    cache.put("a", weights("a", 200))
    assert cache.nbytes == 200 and cache.keys() == ["a"]


def test_pinned_entries_are_never_evicted():
    cache = AdapterCache(budget_bytes=200)
    cache.put("a", weights("a", 100))
    cache.pin("a")
    cache.pin("a")
    cache.put("b", weights("b", 100))
    assert cache.put("c", weights("c", 100)) == ["b"]   # a is older but pinned
    cache.pin("c")
    # all pinned: over budget for now, nothing dropped
    assert cache.put("d", weights("d", 100)) == []
    assert cache.nbytes == 300
    cache.unpin("a")
    assert "a" in cache and cache.is_pinned("a")
    cache.unpin("a")                                    # last pin gone: a is evicted
    assert "a" not in cache and cache.nbytes == 200


def test_entry_larger_than_budget_stays_until_next_put():
    cache = AdapterCache(budget_bytes=100)
    assert cache.put("big", weights("big", 400)) == []
    assert cache.get("big") is not None
    assert cache.put("small", weights("small", 80)) == ["big"]


def test_policy_is_pluggable():
    class MRU(LRUPolicy):
        def victim(self, candidates):
            return next((k for k in reversed(self._order) if k in candidates), None)

    cache = AdapterCache(budget_bytes=200, policy=MRU())
    cache.put("a", weights("a", 100))
    cache.put("b", weights("b", 100))
    assert cache.put("c", weights("c", 100)) == ["b"]


def test_negative_budget_rejected():
    with pytest.raises(ValueError):
        AdapterCache(-1)
