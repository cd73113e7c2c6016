"""Adapter tiers against a real store: resolution, CPU/disk/store tiers, shared fetches, errors."""
from __future__ import annotations

import threading

import pytest

from inference_worker.adapter_checks import ModelShapes, base_model_name, same_base_model
from inference_worker.adapter_manager import AdapterManager, ManagerConfig
from inference_worker.adapter_weights import load_peft_dir
from inference_worker.interfaces import MergeRecipe
from services.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.store_client import StoreClient
from tests.store.harness import free_port

WAIT_S = 60


class CountingStore:
    """StoreClient wrapper that counts downloads."""

    def __init__(self, client):
        self.client, self.downloads = client, 0

    def get(self, ref):
        return self.client.get(ref)

    def download(self, ref, dest, **kwargs):
        self.downloads += 1
        return self.client.download(ref, dest, **kwargs)


@pytest.fixture
def make_manager(store, pushed, tiny_model_dir, tmp_path):
    made = []

    def make(data_dir=None, client=None, **overrides):
        config = ManagerConfig(base_model=base_model_name(tiny_model_dir), data_dir=str(data_dir or tmp_path / "d"),
                               **overrides)
        manager = AdapterManager(config, client or CountingStore(store.client), ModelShapes.from_model_dir(tiny_model_dir))
        made.append(manager)
        return manager
    yield make
    for manager in made:
        manager.close()


def settled(ticket):
    assert ticket.wait(WAIT_S), f"ticket {ticket.key} never settled"
    return ticket


def test_tiers_store_then_cpu_then_disk(make_manager, pushed, tmp_path):
    manager = make_manager()
    ticket = settled(manager.request("qv-r4"))
    assert ticket.error() is None and ticket.ready() and ticket.tier == "store"
    assert ticket.key == "qv-r4@1"
    expected = load_peft_dir(pushed["qv-r4"], "x")
    got = ticket.weights()
    assert set(got.modules) == set(expected.modules) and got.scaling == expected.scaling
    for mkey, (a, b) in expected.modules.items():
        assert got.modules[mkey][0].equal(a) and got.modules[mkey][1].equal(b)
    again = manager.request("qv-r4@1")                    # immutable ref: resolved from memory, CPU hit
    assert again.ready() and again.tier == "cpu" and again.weights() is got
    assert manager.cpu_resident() == ["qv-r4@1"]
    fresh = make_manager(data_dir=tmp_path / "d")         # a restarted worker: disk hit, no download
    assert settled(fresh.request("qv-r4")).tier == "disk" and fresh._store.downloads == 0


def test_concurrent_requests_share_one_fetch(make_manager):
    manager = make_manager()
    tickets = []
    threads = [threading.Thread(target=lambda: tickets.append(manager.request("all-r8"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert all(settled(t).ready() for t in tickets)
    assert manager._store.downloads == 1 and len({id(t.weights()) for t in tickets}) == 1


@pytest.mark.parametrize("ref,error,match", [
    ("no-such-adapter", NotFound, "no-such-adapter"),
    ("qv-r4@99", NotFound, "qv-r4"),
    ("other-base", FailedPrecondition, "other-model"),
    ("wrong-shape", FailedPrecondition, "do not fit"),
    ("kog-r16", FailedPrecondition, "max LoRA rank 8"),
])
def test_errors_land_on_the_ticket(make_manager, ref, error, match):
    ticket = settled(make_manager(max_lora_rank=8).request(ref))
    assert not ticket.ready() and isinstance(ticket.error(), error)
    assert match in str(ticket.error())
    with pytest.raises(RuntimeError):
        ticket.weights()


def test_store_down_is_unavailable(make_manager):
    with StoreClient(f"127.0.0.1:{free_port()}") as client:
        ticket = settled(make_manager(client=client).request("qv-r4"))
        assert isinstance(ticket.error(), Unavailable)


def test_live_tickets_pin_their_cpu_entry(make_manager):
    manager = make_manager(cpu_cache_bytes=1)             # room for nothing unpinned
    held = settled(manager.request("qv-r4"))
    settled(manager.request("mlp-r2"))                    # dropped at once: no one holds it
    assert manager.cpu_resident() == ["qv-r4@1"]
    del held
    settled(manager.request("attn-r8"))
    assert "qv-r4@1" not in manager.cpu_resident()


def test_merge_is_cached_under_its_recipe_key(make_manager):
    from inference_worker.merge import merge_key

    manager = make_manager()
    recipe = MergeRecipe(adapters=("attn-r8", "qv-r8"), weights=(0.7, 0.3), strategy="linear")
    ticket = settled(manager.request_merge(recipe))
    assert ticket.error() is None
    assert ticket.key == merge_key(["attn-r8@1", "qv-r8@1"], recipe) and ticket.key in manager.cpu_resident()
    assert settled(manager.request_merge(recipe)).weights() is ticket.weights()
    bad = settled(manager.request_merge(MergeRecipe(("attn-r8", "qv-r4"), (0.5, 0.5), "linear")))
    assert isinstance(bad.error(), InvalidArgument)       # linear needs equal ranks
    missing = settled(manager.request_merge(MergeRecipe(("attn-r8", "nope"), (0.5, 0.5))))
    assert isinstance(missing.error(), NotFound)
    foreign = settled(manager.request_merge(MergeRecipe(("attn-r8", "other-base"), (0.5, 0.5), "cat")))
    assert isinstance(foreign.error(), FailedPrecondition)
    assert not manager.cpu.is_pinned("attn-r8@1")         # parts are held only while merging
    fast = manager.request_merge(recipe)                  # refs resolved in memory: settled at once
    assert fast.ready() and fast.weights() is ticket.weights()


def test_base_model_names():
    assert same_base_model("model-llama0", "/tmp/x/model-llama0")
    assert same_base_model("meta-llama/Meta-Llama-3-8B", "/models/Meta-Llama-3-8B/")
    assert same_base_model("", "anything") and same_base_model("anything", "")
    assert not same_base_model("tiny-llama", "someone/other-model")


@pytest.mark.gpu
def test_pinned_tier_reads_blobs_into_page_locked_memory(make_manager, pushed):
    """With pinning the disk tier reads the blob straight into page-locked memory."""
    got = settled(make_manager(pin_memory=True).request("all-r8")).weights()
    expected = load_peft_dir(pushed["all-r8"], "x")
    assert set(got.modules) == set(expected.modules)
    for mkey, (a, b) in expected.modules.items():
        mine_a, mine_b = got.modules[mkey]
        assert mine_a.is_pinned() and mine_b.is_pinned() and mine_a.equal(a) and mine_b.equal(b)
