"""Concurrent pushes of one name: distinct versions, no corruption; identical pushes: one version."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.store.harness import StoreHarness
from tests.store.synthetic import sha256_file, write_adapter

NUM_THREADS = 8


def push_all(clients, dirs, name):
    barrier = threading.Barrier(len(dirs), timeout=60)

    def push(i):
        barrier.wait()
        return clients[i % len(clients)].upload(dirs[i], name, timeout=60)
    with ThreadPoolExecutor(len(dirs)) as pool:
        return list(pool.map(push, range(len(dirs)), timeout=120))


def check_each_version(client, adapters, tmp_path):
    for a in adapters:
        dest = tmp_path / f"dl-{a.version}"
        assert client.download(f"{a.name}@{a.version}", dest, resume=False) == a
        assert sha256_file(dest) == a.sha256


def test_concurrent_pushes_get_distinct_versions(store, tmp_path):
    dirs = [write_adapter(tmp_path / f"a{i}", seed=i) for i in range(NUM_THREADS)]
    adapters = push_all([store.client], dirs, "busy")
    assert sorted(a.version for a in adapters) == list(range(1, NUM_THREADS + 1))
    assert len({a.sha256 for a in adapters}) == NUM_THREADS
    check_each_version(store.client, adapters, tmp_path)
    snap = store.snapshot()
    assert len(snap["rows"]) == NUM_THREADS and len(snap["blobs"]) == NUM_THREADS and snap["tmp"] == []


def test_concurrent_identical_pushes_are_one_version(store, tmp_path):
    same = write_adapter(tmp_path / "same", seed=7)
    adapters = push_all([store.client], [same] * NUM_THREADS, "same")
    assert {(a.version, a.sha256) for a in adapters} == {(1, adapters[0].sha256)}
    assert len(store.rows()) == 1


def test_two_store_processes_share_one_index(store, data_dir, db_url, tmp_path):
    """Two stores on one database (no shared process lock): the database's unique constraints
    and the retry still give distinct versions and one version per content."""
    other = StoreHarness(data_dir, db_url).start()
    try:
        dirs = [write_adapter(tmp_path / f"a{i}", seed=i) for i in range(NUM_THREADS)]
        adapters = push_all([store.client, other.client], dirs, "shared")
        assert sorted(a.version for a in adapters) == list(range(1, NUM_THREADS + 1))
        check_each_version(other.client, adapters, tmp_path)
        again = push_all([store.client, other.client], [dirs[0]] * 4, "shared")
        first = next(a for a in adapters if a.sha256 == again[0].sha256)
        assert {a.version for a in again} == {first.version}
    finally:
        other.stop()
