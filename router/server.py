"""The router process: discovery feeds the worker view, the servicer routes through it."""
from __future__ import annotations

import logging

from protos import router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.discovery import Discovery, Resolver, parse_workers, resolve_dns
from router.service import RouterServicer
from router.worker_view import WorkerView
from services.server import GrpcServer
from services.telemetry import Telemetry, global_telemetry

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class RouterServer:
    def __init__(self, config: RouterConfig, resolver: Resolver = resolve_dns, telemetry: Telemetry | None = None):
        """telemetry: None uses the process's global providers (set up by the CLI)."""
        telemetry = telemetry or global_telemetry()
        self.config = config
        self.view = WorkerView(config, telemetry)
        self.discovery = Discovery(parse_workers(config.workers), self.view.set_addresses,
                                   config.resolve_interval_s, resolver)
        self.servicer = RouterServicer(self.view, config, telemetry.metrics)
        self.grpc = GrpcServer(config.server_config(), [(router_pb2_grpc.add_RouterServicer_to_server, self.servicer)],
                               [SERVICE_NAME], interceptors=[telemetry.server_interceptor()],
                               intake=self.servicer.intake)

    def start(self) -> int:
        """Listen, give the workers a moment to report, then turn SERVING. Returns the port.

        Serving before any status arrived still works (unknown workers are tried as a
        last resort), so the wait is bounded and short: a restarted router serves at once.
        """
        self.discovery.start()
        port = self.grpc.start()
        if not self.view.wait_until_any_up(self.config.ready_timeout_s):
            log.warning("no worker up after %.1fs; serving anyway", self.config.ready_timeout_s)
        self.grpc.set_serving()
        return port

    @property
    def address(self) -> str:
        return self.grpc.address

    def stop(self, grace_s: float | None = None) -> None:
        self.grpc.drain(grace_s)
        self.discovery.stop()
        self.view.stop()

    def serve_forever(self) -> int:
        """CLI: serve until SIGTERM/SIGINT, drain in-flight streams, exit 0."""
        self.grpc.install_signal_handlers()
        self.start()
        self.grpc.wait()
        self.discovery.stop()
        self.view.stop()
        return 0
