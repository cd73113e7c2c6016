"""Two fake workers and a router in this process."""
from __future__ import annotations

import time

import grpc
import pytest

from protos import router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.server import RouterServer
from tests.router.fake_worker import FakeWorker

FAST = {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.3, "ready_timeout_s": 5, "grace_s": 0}


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout}s")


def healthy(stub) -> set[str]:
    return {w.address for w in stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5).workers if w.healthy}


class Cluster:
    def __init__(self, workers: list[FakeWorker], router: RouterServer):
        self.workers = workers
        self.router = router
        self.channel = grpc.insecure_channel(router.address)
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    def worker(self, address: str) -> FakeWorker:
        return next(w for w in self.workers if w.address == address)


def start_router(workers: str, **overrides) -> RouterServer:
    router = RouterServer(RouterConfig(listen="127.0.0.1:0", workers=workers, **{**FAST, **overrides}))
    router.start()
    return router


@pytest.fixture
def cluster():
    fakes = [FakeWorker("fake-a").start(), FakeWorker("fake-b").start()]
    router = start_router(",".join(f.address for f in fakes))
    c = Cluster(fakes, router)
    wait_for(lambda: healthy(c.stub) == {f.address for f in fakes}, what="both workers up")
    yield c
    c.channel.close()
    router.stop(0)
    for f in fakes:
        f.stop()
