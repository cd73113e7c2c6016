"""Router -> real workers -> real store, over gRPC: equal outputs, affinity, failover, cancellation.

Tests run in file order on one cluster; the disruptive ones (kill a worker, restart
the router) come last. "Promptly" is a generous bounded wait, never a timing assertion.
"""
from __future__ import annotations

import grpc
import pytest

from protos import generate_pb2, inference_worker_pb2, router_pb2, router_pb2_grpc
from services.config import WORKER_METADATA_KEY
from services.generate_cli import build_request
from tests.router.conftest import wait_for

pytestmark = pytest.mark.timeout(600)
WORKERS = {"worker-0", "worker-1"}


def ask(adapter: str = "", max_tokens: int = 8, ignore_eos: bool = False) -> generate_pb2.GenerateRequest:
    return build_request("The quick brown fox", adapter=adapter, max_tokens=max_tokens, temperature=0.0,
                         ignore_eos=ignore_eos)


def long_ask(adapter: str = "") -> generate_pb2.GenerateRequest:
    """Streams for many seconds: lets a test act mid-stream."""
    return ask(adapter, max_tokens=900, ignore_eos=True)


def run(stub, request, timeout: float = 60) -> tuple[str, list[int]]:
    """(serving worker id, token ids)."""
    call = stub.Generate(request, timeout=timeout)
    ids = [t for m in call for t in m.token_ids]
    return served_by(call), ids


def served_by(call) -> str:
    return dict(call.initial_metadata())[WORKER_METADATA_KEY]


def status(e2e, worker_id: str) -> inference_worker_pb2.WorkerStatus:
    return e2e.worker(worker_id).GetStatus(inference_worker_pb2.GetStatusRequest(), timeout=10)


def healthy(e2e) -> set[str]:
    reply = e2e.router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=10)
    return {w.status.worker_id for w in reply.workers if w.healthy}


def gpu_holders(e2e, adapter: str) -> set[str]:
    return {wid for wid in WORKERS if any(k.startswith(adapter + "@") for k in status(e2e, wid).gpu_adapters)}


def router_sees_idle(e2e) -> bool:
    """The router's last status of every worker shows nothing running or waiting."""
    reply = e2e.router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=10)
    return all(w.status.running_requests + w.status.waiting_requests == 0 for w in reply.workers)


def idle(e2e, wid: str) -> bool:
    s = status(e2e, wid)
    return s.running_requests == 0 and s.waiting_requests == 0 and s.kv_blocks_used == 0


def test_outputs_through_the_router_equal_direct_outputs(e2e):
    for adapter in ("alpha", "beta", ""):
        served, routed = run(e2e.router, ask(adapter))
        assert len(routed) == 8
        for wid in sorted(WORKERS):
            direct = [t for m in e2e.worker(wid).Generate(ask(adapter), timeout=60) for t in m.token_ids]
            assert direct == routed, (adapter, wid, served)
    assert run(e2e.router, ask("alpha"))[1] != run(e2e.router, ask("beta"))[1]   # the adapter matters


def test_repeated_requests_for_one_adapter_stay_on_one_worker(e2e):
    assert len({run(e2e.router, ask("alpha"))[0] for _ in range(6)}) == 1


def test_hot_adapter_spreads_cold_one_does_not(e2e):
    hot_served, cold_served = set(), set()
    for _ in range(3):
        # the router counts a worker's load from its last status: let the previous round's
        # "running" statuses clear, or the cold adapter's home looks over its bound
        wait_for(lambda: router_sees_idle(e2e), timeout=10, what="router's view of the workers idle")
        # long streams: all 12 still run on both workers when the cold request is routed (had one
        # worker's share already finished, the other would be over the load bound, and the cold
        # adapter's spill there would be the policy working, not a fault)
        hot = [e2e.router.Generate(long_ask("hot"), timeout=120) for _ in range(12)]
        hot_served |= {served_by(call) for call in hot}       # metadata: every hot request is streaming
        cold_served.add(run(e2e.router, ask("cold"))[0])      # one cold request under that load
        for call in hot:
            assert any(m.token_ids for _, m in zip(range(2), call))   # streaming tokens...
            call.cancel()                                              # ...then not needed any more
    assert hot_served == WORKERS
    assert len(cold_served) == 1
    assert gpu_holders(e2e, "hot") == WORKERS                            # the workers agree
    assert gpu_holders(e2e, "cold") == cold_served


def test_client_cancellation_frees_the_request_on_the_worker(e2e):
    call = e2e.router.Generate(long_ask("beta"), timeout=120)
    next(call)
    wid = served_by(call)
    s = status(e2e, wid)
    assert s.running_requests + s.waiting_requests == 1 and s.kv_blocks_used > 0
    call.cancel()
    wait_for(lambda: idle(e2e, wid), timeout=10, what="request gone and KV blocks freed on the worker")


def test_killed_worker_ends_its_streams_and_traffic_moves_then_returns(e2e):
    call = e2e.router.Generate(long_ask("alpha"), timeout=120)
    next(call)
    victim = served_by(call)
    survivor = (WORKERS - {victim}).pop()
    e2e.cluster.kill(victim)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:                              # bounded by the 120 s deadline, never a hang
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and victim in err.value.details()
    for adapter in ("alpha", "beta", "cold", ""):
        assert run(e2e.router, ask(adapter))[0] == survivor
    wait_for(lambda: healthy(e2e) == {survivor}, timeout=10, what="router marks the worker down")

    e2e.cluster.start_worker(int(victim.rpartition("-")[2]))            # same port, fresh process
    wait_for(lambda: healthy(e2e) == WORKERS, timeout=30, what="router sees the worker back")
    # A burst of base-model requests: the router counts what it sent, so both take some.
    calls = [e2e.router.Generate(ask("", 32, ignore_eos=True), timeout=60) for _ in range(4)]
    for c in calls:
        assert sum(len(m.token_ids) for m in c) == 32
    assert {served_by(c) for c in calls} == WORKERS


def test_router_restart_mid_traffic(e2e):
    call = e2e.router.Generate(long_ask("alpha"), timeout=120)
    next(call)
    e2e.cluster.kill("router")
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    e2e.cluster.start_router()                      # returns once SERVING; no state to rebuild
    with grpc.insecure_channel(e2e.cluster.router_address) as channel:   # a new client, no reconnect backoff
        served, ids = run(router_pb2_grpc.RouterStub(channel), ask("alpha"))
    assert len(ids) == 8 and served in WORKERS      # the first request after the restart succeeds
    wait_for(lambda: all(idle(e2e, w) for w in WORKERS), timeout=10, what="the cut stream freed on its worker")
