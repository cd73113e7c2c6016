"""Build the store's gRPC server (used by the CLI and by tests)."""
from __future__ import annotations

from adapter_store.config import StoreConfig
from adapter_store.service import AdapterStoreServicer
from adapter_store.store import AdapterStore
from protos import adapter_store_pb2, adapter_store_pb2_grpc
from services.config import ServerConfig
from services.server import GrpcServer

SERVICE_NAME = adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].full_name


def build_server(store_config: StoreConfig, server_config: ServerConfig) -> tuple[GrpcServer, AdapterStore]:
    """The store is opened (schema created, startup cleanup done) before the server exists."""
    store = AdapterStore(store_config)
    servicer = AdapterStoreServicer(store)
    registration = (adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server, servicer)
    server = GrpcServer(server_config, [registration], [SERVICE_NAME])
    return server, store
