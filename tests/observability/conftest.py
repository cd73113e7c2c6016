"""Store, worker and router in this process, each with its own Telemetry (as three processes
would have), all exporting spans to one in-memory exporter and metrics to in-memory readers."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapter_store.config import StoreConfig
from adapter_store.server import build_server
from inference_worker.server import Worker, WorkerConfig, build_worker
from protos import router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.server import RouterServer
from services.config import ServerConfig
from services.generate_cli import build_request
from services.server import GrpcServer
from services.store_client import StoreClient
from services.telemetry import Telemetry, TelemetryConfig, setup_telemetry
from tests.router.conftest import FAST
from tests.worker.harness import engine_config

SERVICES = ("store", "worker", "router")
RPC_TIMEOUT_S = 60.0


@dataclass
class Observed:
    exporter: InMemorySpanExporter
    readers: dict[str, InMemoryMetricReader]
    telemetry: dict[str, Telemetry]
    store_server: GrpcServer
    worker: Worker
    router: RouterServer
    stub: router_pb2_grpc.RouterStub
    adapter_factory: object
    model_dir: object

    def upload(self, name: str, seed: int):
        """Push a fresh adapter (not cached anywhere in the worker) with an untraced client."""
        with StoreClient(self.store_server.address) as client:
            return client.upload(self.adapter_factory(self.model_dir, seed=seed), name)

    def generate(self, adapter: str = "", max_tokens: int = 4) -> list:
        request = build_request("The quick brown fox", adapter=adapter, max_tokens=max_tokens, temperature=0.0,
                                ignore_eos=True)
        return list(self.stub.Generate(request, timeout=RPC_TIMEOUT_S))


@pytest.fixture(scope="package")
def observed(tmp_path_factory, tiny_model_dir, adapter_factory):
    exporter = InMemorySpanExporter()
    readers = {service: InMemoryMetricReader() for service in SERVICES}
    # the worker's Prometheus endpoint as a deployment asks for it: OPENLORA_METRICS_PORT=0 -> any free port
    configs = {"worker": TelemetryConfig.from_env({"OPENLORA_METRICS_PORT": "0",
                                                   "OPENLORA_METRICS_HOST": "127.0.0.1"})}
    tel = {service: setup_telemetry(f"openlora-{service}", configs.get(service, TelemetryConfig()),
                                    span_exporter=exporter, metric_readers=[readers[service]], set_global=False)
           for service in SERVICES}
    data = tmp_path_factory.mktemp("observed")
    store_server, store = build_server(StoreConfig(data_dir=data / "store"),
                                       ServerConfig(listen="127.0.0.1:0", grace_s=0), tel["store"])
    store_server.start()
    store_server.set_serving()
    # one adapter slot: a second adapter evicts the first
    worker = build_worker(WorkerConfig(model_dir=str(tiny_model_dir), store=store_server.address,
                                       listen="127.0.0.1:0", data_dir=str(data / "worker"),
                                       worker_id="observed-worker", grace_s=0,
                                       engine=engine_config(max_adapter_slots=1)), tel["worker"])
    worker.start()
    router = RouterServer(RouterConfig(listen="127.0.0.1:0", workers=worker.server.address, **FAST),
                          telemetry=tel["router"])
    router.start()
    channel = grpc.insecure_channel(router.address)
    stub = router_pb2_grpc.RouterStub(channel)
    workers = stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=RPC_TIMEOUT_S).workers
    assert [w.healthy for w in workers] == [True]
    yield Observed(exporter, readers, tel, store_server, worker, router, stub, adapter_factory, tiny_model_dir)
    channel.close()
    router.stop(0)
    worker.stop(grace_s=0)
    store_server.stop()
    store.close()
    for t in tel.values():
        t.shutdown()
