"""RouterConfig: where the router listens, where the workers are, how it routes."""
from __future__ import annotations

from dataclasses import dataclass

from router.discovery import parse_workers
from services.config import ServerConfig


@dataclass
class RouterConfig:
    listen: str = "0.0.0.0:50051"
    workers: str = ""                     # "HOST:PORT[,HOST:PORT...]" or "dns:///name:port"
    resolve_interval_s: float = 5.0       # DNS re-resolution: scale up/down is seen this fast
    status_interval_ms: int = 200         # WatchStatus: at most one status per worker this often
    reconnect_initial_s: float = 0.1      # backoff of a broken status stream, doubled per failure,
    reconnect_max_s: float = 2.0          #   capped here, with jitter so routers don't reconnect in step
    health_timeout_s: float = 2.0         # grpc.health.v1 check before (re)opening a status stream
    load_factor: float = 1.25             # c of "consistent hashing with bounded loads": load <= c * average
    min_load_bound: int = 4               # ...but a worker always takes this many (batching is ~free)
    affinity_ttl_s: float = 30.0          # an adapter sent to a worker counts as resident there this long
    max_attempts: int = 3                 # workers tried per request, all before the first token
    ready_timeout_s: float = 5.0          # at start, wait this long for a first worker before SERVING
    grace_s: float = 10.0                 # drain: in-flight streams finish up to this long

    def __post_init__(self) -> None:
        self.server_config()                # validates listen and grace_s
        parse_workers(self.workers)                                     # raises ValueError when malformed
        if self.resolve_interval_s <= 0:
            raise ValueError("resolve_interval_s must be > 0")
        if self.status_interval_ms < 1:
            raise ValueError("status_interval_ms must be >= 1")
        if not (0 < self.reconnect_initial_s <= self.reconnect_max_s):
            raise ValueError("need 0 < reconnect_initial_s <= reconnect_max_s")
        if self.health_timeout_s <= 0:
            raise ValueError("health_timeout_s must be > 0")
        if self.load_factor < 1:
            raise ValueError("load_factor must be >= 1 (1 = perfectly balanced, no affinity)")
        if self.min_load_bound < 1:
            raise ValueError("min_load_bound must be >= 1")
        if self.affinity_ttl_s < 0:
            raise ValueError("affinity_ttl_s must be >= 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.ready_timeout_s < 0:
            raise ValueError("ready_timeout_s must be >= 0")

    def server_config(self) -> ServerConfig:
        return ServerConfig(self.listen, grace_s=self.grace_s)
