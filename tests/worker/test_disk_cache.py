"""Disk tier: blobs by sha256, atomic fill, hash verified, LRU by bytes, held blobs kept."""
from __future__ import annotations

import hashlib
import os
import threading

import pytest

from inference_worker.disk_cache import DiskCache


def blob(n: int, seed: int) -> tuple[bytes, str]:
    data = bytes((seed + i) % 251 for i in range(n))
    return data, hashlib.sha256(data).hexdigest()


def writer(data: bytes, calls: list | None = None):
    def write(path):
        if calls is not None:
            calls.append(path)
        path.write_bytes(data)
    return write


def test_miss_fill_then_hit(tmp_path):
    cache = DiskCache(tmp_path, budget_bytes=10_000)
    data, sha = blob(1000, 1)
    with cache.hold(sha) as path:
        assert path is None
    calls = []
    with cache.hold(sha, writer(data, calls)) as path:
        assert path.read_bytes() == data and path == tmp_path / "blobs" / sha[:2] / sha
    with cache.hold(sha, writer(data, calls)) as path:
        assert path.read_bytes() == data
    assert len(calls) == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_bad_hash_is_refused_and_leaves_nothing(tmp_path):
    cache = DiskCache(tmp_path, budget_bytes=10_000)
    data, sha = blob(100, 1)
    with pytest.raises(ValueError, match="hashes to"), cache.hold(sha, writer(data + b"x")):
        pass
    assert cache.nbytes() == 0 and list((tmp_path / "tmp").iterdir()) == []


def test_corrupt_blob_from_earlier_run_is_a_miss(tmp_path):
    data, sha = blob(100, 2)
    with DiskCache(tmp_path, 10_000).hold(sha, writer(data)):
        pass
    path = tmp_path / "blobs" / sha[:2] / sha
    path.write_bytes(b"garbage")
    with DiskCache(tmp_path, 10_000).hold(sha) as found:   # a new process re-hashes
        assert found is None
    assert not path.exists()


def test_lru_eviction_by_bytes_skips_held_blobs(tmp_path):
    cache = DiskCache(tmp_path, budget_bytes=250)
    blobs = [blob(100, i) for i in range(3)]
    for i, (data, sha) in enumerate(blobs[:2]):
        with cache.hold(sha, writer(data)) as path:
            os.utime(path, (1000 + i, 1000 + i))           # deterministic ages: 0 older than 1
    with cache.hold(blobs[0][1]) as path:                   # a hit makes 0 the most recent...
        assert path is not None
        with cache.hold(blobs[2][1], writer(blobs[2][0])):  # ...so adding 2 evicts 1
            pass
    present = {sha for _, sha in blobs if (tmp_path / "blobs" / sha[:2] / sha).exists()}
    assert present == {blobs[0][1], blobs[2][1]}
    with cache.hold(blobs[0][1]):                           # held: the budget may overflow, not the reader
        cache.budget_bytes = 0
        assert cache.evict() == [blobs[2][1]]
    assert cache.evict() == [blobs[0][1]] and cache.nbytes() == 0


def test_concurrent_fills_write_once(tmp_path):
    cache = DiskCache(tmp_path, budget_bytes=10_000)
    data, sha = blob(5000, 3)
    calls, results = [], []

    def fetch():
        with cache.hold(sha, writer(data, calls)) as path:
            results.append(path.read_bytes() == data)
    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [True] * 4 and len(calls) == 1


def test_path_only_from_a_hash(tmp_path):
    with pytest.raises(ValueError):
        DiskCache(tmp_path, 1).blob_path("../../etc/passwd")
