"""Build the store's gRPC server (used by the CLI and by tests)."""
from __future__ import annotations

from adapter_store.config import StoreConfig
from adapter_store.service import AdapterStoreServicer
from adapter_store.store import AdapterStore
from protos import adapter_store_pb2, adapter_store_pb2_grpc
from services.config import ServerConfig
from services.server import GrpcServer
from services.telemetry import Telemetry, global_telemetry

SERVICE_NAME = adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].full_name


def build_server(store_config: StoreConfig, server_config: ServerConfig,
                 telemetry: Telemetry | None = None) -> tuple[GrpcServer, AdapterStore]:
    """The store is opened (schema created, startup cleanup done) before the server exists.

    telemetry: None uses the process's global providers (set up by the CLI)."""
    telemetry = telemetry or global_telemetry()
    store = AdapterStore(store_config)
    servicer = AdapterStoreServicer(store, telemetry.metrics)
    registration = (adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server, servicer)
    server = GrpcServer(server_config, [registration], [SERVICE_NAME],
                        interceptors=[telemetry.server_interceptor()])
    return server, store
