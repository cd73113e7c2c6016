"""Config dataclasses shared by the services. Each validates itself in __post_init__."""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_ROUTER = "127.0.0.1:50051"
DEFAULT_STORE = "127.0.0.1:50052"
DEFAULT_WORKER = "127.0.0.1:50053"

# Response metadata naming the worker that serves a routed request (router -> client).
WORKER_METADATA_KEY = "x-openlora-worker"

# Messages stay far below gRPC's 4 MiB default; chunks are 1 MiB.
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 8 << 20


def router_address() -> str:
    return os.environ.get("OPENLORA_ROUTER", DEFAULT_ROUTER)


def store_address() -> str:
    return os.environ.get("OPENLORA_STORE", DEFAULT_STORE)


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536):
        raise ValueError(f"address must be HOST:PORT, got {address!r}")


@dataclass
class ServerConfig:
    """What every gRPC server needs: where to listen and how to stop."""

    listen: str
    max_workers: int = 256          # one thread per in-flight stream
    grace_s: float = 10.0           # drain: finish in-flight work up to this long
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        _check_address(self.listen)
        if self.max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        if self.grace_s < 0:
            raise ValueError("grace_s must be >= 0")
