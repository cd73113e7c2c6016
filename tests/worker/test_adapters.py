"""LoadAdapter / UnloadAdapter / WatchStatus, and more adapters than device slots."""
from __future__ import annotations

import grpc
import pytest

from protos import inference_worker_pb2 as pb
from tests.worker.harness import StreamReader, run_concurrently, tokens_of


def test_load_pin_unload(worker):
    loaded = worker.stub.LoadAdapter(pb.LoadAdapterRequest(adapter="mlp-r2", pin=True), timeout=60)
    assert loaded.adapter_key == "mlp-r2@1" and loaded.tier in ("store", "disk", "cpu") and loaded.load_ms > 0
    status = worker.status()
    assert "mlp-r2@1" in status.gpu_adapters and "mlp-r2@1" in status.cpu_adapters
    assert status.free_adapter_slots == status.total_adapter_slots - 1       # pinned
    again = worker.stub.LoadAdapter(pb.LoadAdapterRequest(adapter="mlp-r2@1"), timeout=60)
    assert again.tier == "gpu"
    assert worker.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter="mlp-r2"), timeout=60).was_loaded
    status = worker.status()
    assert "mlp-r2@1" not in status.gpu_adapters and status.free_adapter_slots == status.total_adapter_slots
    assert "mlp-r2@1" in status.cpu_adapters                                  # lower tiers keep it
    assert not worker.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter="mlp-r2"), timeout=60).was_loaded


@pytest.mark.parametrize("ref,code", [("no-such-adapter", grpc.StatusCode.NOT_FOUND),
                                      ("other-base", grpc.StatusCode.FAILED_PRECONDITION),
                                      ("", grpc.StatusCode.INVALID_ARGUMENT)])
def test_load_errors(worker, ref, code):
    with pytest.raises(grpc.RpcError) as err:
        worker.stub.LoadAdapter(pb.LoadAdapterRequest(adapter=ref), timeout=60)
    assert err.value.code() == code


def test_watch_status_shows_adapters_arrive(make_worker):
    w = make_worker(max_adapter_slots=2)
    watch = StreamReader(w.stub.WatchStatus(pb.WatchStatusRequest(interval_ms=20), timeout=60))
    first = watch.next()
    assert first.worker_id == "test-worker" and first.device == "cpu" and first.address == w.address
    assert first.total_adapter_slots == 2 and not first.gpu_adapters and not first.draining
    w.stub.LoadAdapter(pb.LoadAdapterRequest(adapter="qv-r4", pin=False), timeout=60)
    seen = watch.wait_for(lambda s: "qv-r4@1" in s.gpu_adapters)
    assert "qv-r4@1" in seen.cpu_adapters
    watch.call.cancel()
    assert watch.done.wait(60)


def test_more_adapters_than_slots(make_worker, reference):
    """6 adapters over 2 slots: waiting for a slot, eviction and reload, all still exact."""
    w = make_worker(max_adapter_slots=2)
    ids = w.tokenizer("The quick brown fox")["input_ids"]
    adapters = ["qv-r4", "all-r8", "kog-r16", "mlp-r2", "attn-r8", "qv-r8", "qv-r4", "all-r8"]
    results = run_concurrently([lambda a=a: w.generate(ids=ids, adapter=a, max_tokens=8) for a in adapters])
    for adapter, messages in zip(adapters, results):
        assert tokens_of(messages) == reference.greedy(ids, 8, adapter), adapter
    status = w.wait_idle()
    assert len(status.gpu_adapters) <= 2 and len(status.cpu_adapters) == 6
