"""The router's proxy against fake workers: streaming, retries, errors, cancellation, deadlines."""
from __future__ import annotations

import threading

import grpc
import pytest

from protos import generate_pb2, router_pb2, router_pb2_grpc
from services.config import WORKER_METADATA_KEY
from tests.router.conftest import healthy, start_router, wait_for
from tests.router.fake_worker import FakeWorker


def request(adapter: str = "", **kw) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(prompt="hi", adapter=adapter, **kw)


def put_on_gpu(cluster, worker: FakeWorker, adapter: str) -> None:
    """Make `worker` the router's first choice for `adapter` (policy: on GPU first)."""
    worker.set_status(gpu_adapters=[adapter + "@1"])
    wait_for(lambda: any(adapter + "@1" in w.status.gpu_adapters for w in cluster.stub.ListWorkers(
        router_pb2.ListWorkersRequest()).workers), what="status seen by the router")


def test_streams_token_by_token_with_worker_id(cluster):
    a, _ = cluster.workers
    put_on_gpu(cluster, a, "x")
    a.gate = threading.Event()                     # holds every token after the first
    call = cluster.stub.Generate(request("x"), timeout=30)
    first = next(call)                             # arrives while the worker holds the rest
    assert first.text == "t0 " and first.worker_id == "fake-a"
    assert dict(call.initial_metadata())[WORKER_METADATA_KEY] == "fake-a"
    a.gate.set()
    rest = list(call)
    assert [m.text for m in rest] == ["t1 ", "t2 "] and rest[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert all(m.worker_id == "fake-a" for m in rest)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_retries_another_worker_before_first_token(cluster, code):
    a, b = cluster.workers
    put_on_gpu(cluster, a, "x")
    a.fail_before_first = code
    out = list(cluster.stub.Generate(request("x"), timeout=30))
    assert len(a.calls) == 1 and len(b.calls) == 1
    assert {m.worker_id for m in out} == {"fake-b"} and len(out) == 3


def test_no_retry_after_first_token(cluster):
    a, b = cluster.workers
    put_on_gpu(cluster, a, "x")
    a.fail_after_first = grpc.StatusCode.UNAVAILABLE
    call = cluster.stub.Generate(request("x"), timeout=30)
    assert next(call).text == "t0 "
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "fake-a" in err.value.details()
    assert len(b.calls) == 0


def test_request_errors_pass_through_without_retry(cluster):
    a, b = cluster.workers
    put_on_gpu(cluster, a, "x")
    a.fail_before_first = grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.stub.Generate(request("x"), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "fake-a refuses" in err.value.details()
    assert len(b.calls) == 0


def test_unavailable_when_no_worker_can_serve(cluster):
    for w in cluster.workers:
        w.fail_before_first = grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.stub.Generate(request("x"), timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no worker can serve adapter 'x'" in err.value.details() and "fake-b" in err.value.details()


def test_unavailable_without_workers():
    router = start_router("", ready_timeout_s=0)
    try:
        with grpc.insecure_channel(router.address) as ch, pytest.raises(grpc.RpcError) as err:
            list(router_pb2_grpc.RouterStub(ch).Generate(request(), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no healthy worker" in err.value.details()
    finally:
        router.stop(0)


def test_client_cancellation_reaches_the_worker(cluster):
    for w in cluster.workers:
        w.forever = True
    call = cluster.stub.Generate(request(), timeout=60)
    first = next(call)
    upstream = cluster.worker(next(w.address for w in cluster.workers if w.calls)).calls[0]
    assert first.text == "t0 " and not upstream.cancelled.is_set()
    call.cancel()
    assert upstream.cancelled.wait(10), "the worker never saw the cancellation"


def test_drain_refuses_new_streams_and_waits_for_running_ones(cluster):
    """SIGTERM's drain: while a stream runs, the router still answers; new Generate calls get UNAVAILABLE
    (clients retry another router) and ListWorkers works; the drain ends when the running stream does."""
    for w in cluster.workers:
        w.forever = True
    call = cluster.stub.Generate(request(), timeout=60)
    assert next(call).text == "t0 "
    drain = threading.Thread(target=cluster.router.grpc.drain, args=(60.0,), daemon=True)
    drain.start()
    wait_for(cluster.router.servicer.intake.draining.is_set, what="the drain to begin")
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.stub.Generate(request(), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "router is draining" in err.value.details()
    assert healthy(cluster.stub) == {w.address for w in cluster.workers}
    assert drain.is_alive()
    call.cancel()
    drain.join(30)
    assert not drain.is_alive()


def test_deadline_is_passed_on(cluster):
    list(cluster.stub.Generate(request(request_id="with"), timeout=30))
    list(cluster.stub.Generate(request(request_id="without")))
    seen = {c.request.request_id: c.time_remaining for w in cluster.workers for c in w.calls}
    assert 0 < seen["with"] <= 31                  # grpc-timeout is coarse: rounds up a little
    assert seen["without"] > 1e6                   # no deadline stays no deadline


def test_burst_spreads_by_in_flight_counts(cluster):
    """Statuses lag; the router counts what it sent, so two idle workers share a burst."""
    for w in cluster.workers:
        w.forever = True
    calls = [cluster.stub.Generate(request(), timeout=60) for _ in range(4)]
    served = [dict(c.initial_metadata())[WORKER_METADATA_KEY] for c in calls]
    for c in calls:
        c.cancel()
    assert sorted(served) == ["fake-a", "fake-a", "fake-b", "fake-b"]


def test_worker_down_is_out_and_back_is_in(cluster):
    a, b = cluster.workers
    put_on_gpu(cluster, a, "x")
    port = a.port
    a.stop()
    wait_for(lambda: healthy(cluster.stub) == {b.address}, what="router marks the worker down")
    for _ in range(3):
        assert {m.worker_id for m in cluster.stub.Generate(request("x"), timeout=30)} == {"fake-b"}
    a.calls.clear()
    a.start(port)                                  # same address, fresh process
    wait_for(lambda: healthy(cluster.stub) == {a.address, b.address}, what="router sees it back")
    put_on_gpu(cluster, a, "y")
    assert {m.worker_id for m in cluster.stub.Generate(request("y"), timeout=30)} == {"fake-a"}


def test_list_workers_reports_status(cluster):
    workers = cluster.stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5).workers
    assert {w.status.worker_id for w in workers} == {"fake-a", "fake-b"}
    assert all(w.healthy and w.last_seen_ago_ms >= 0 for w in workers)
