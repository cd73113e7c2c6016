"""The gRPC server bootstrap every service uses.

Health (grpc.health.v1) turns SERVING once the service is ready; reflection lists
the services; SIGTERM/SIGINT drain: health NOT_SERVING, the service's intake stops
(Intake: new calls get UNAVAILABLE), the calls it admitted finish while the server
still answers, in-flight RPCs finish up to the grace period,
then the process exits 0.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.config import ServerConfig
from services.errors import Unavailable

log = logging.getLogger(__name__)

Registration = tuple[Callable[[object, grpc.Server], None], object]


class GrpcServer:
    def __init__(self, config: ServerConfig, registrations: Sequence[Registration],
                 service_names: Iterable[str], interceptors: Sequence[grpc.ServerInterceptor] = (),
                 intake: Intake | None = None):
        """intake: the service's calls, which a drain stops and waits for (Intake)."""
        self.config = config
        self.service_names = list(service_names)
        self._intake = intake
        self._stopped = threading.Event()
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 0),
                   # clients ping every 10 s (services/channels.py): allow it
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                   ("grpc.http2.max_ping_strikes", 0)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers),
                                  options=options, interceptors=list(interceptors))
        for add, servicer in registrations:
            add(servicer, self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = 0

    def start(self) -> int:
        self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        self.server.start()
        self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        return self.port

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{self.port}"

    def set_serving(self) -> None:
        self._set_status(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s", ",".join(self.service_names), self.address)

    def _set_status(self, status) -> None:
        self.health.set("", status)
        for name in self.service_names:
            self.health.set(name, status)

    def drain(self, grace_s: float | None = None) -> None:
        """Stop taking work, let in-flight RPCs finish (up to the grace period), stop."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        log.info("draining (grace %.1fs)", grace)
        self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._intake is not None:
            self._intake.drain()
            # the server keeps answering while the running work finishes, so a new call gets the
            # service's own refusal (UNAVAILABLE: a router retries elsewhere); once grpc's stop
            # begins, a call racing it may be cancelled instead (CANCELLED, which nobody retries)
            self._intake.wait_idle(grace)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        self._stopped.set()
        log.info("stopped")

    def stop(self, grace_s: float = 0.0) -> None:
        self.drain(grace_s)

    def install_signal_handlers(self) -> None:
        def handle(signum, _frame):
            log.info("signal %s", signal.Signals(signum).name)
            threading.Thread(target=self.drain, daemon=True).start()
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def wait(self) -> None:
        """Block until drained (main thread stays responsive to signals)."""
        while not self._stopped.wait(0.5):
            pass


class Intake:
    """A service's intake of calls: drain() stops it (new calls get UNAVAILABLE, which a router or client
    retries elsewhere), wait_idle(timeout) waits for the calls already running (GrpcServer's drain)."""

    def __init__(self, what: str) -> None:
        self.what = what                      # "worker", "router": said in the refusal
        self.draining = threading.Event()
        self._running = 0
        self._idle = threading.Condition()

    def drain(self) -> None:
        self.draining.set()

    @contextlib.contextmanager
    def admit(self):
        """Runs a call (counted) or refuses it (UNAVAILABLE) once draining."""
        with self._idle:
            self._running += 1
        try:
            # checked once counted: drain() comes before wait_idle(), so a call the drain does not wait
            # for sees the flag
            if self.draining.is_set():
                raise Unavailable(f"{self.what} is draining")
            yield
        finally:
            with self._idle:
                self._running -= 1
                if self._running == 0:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once no admitted call runs; False if some still do after timeout seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)


def serve_forever(server: GrpcServer) -> int:
    """CLI entry: start, mark SERVING, wait for a signal, drain, return exit code 0."""
    server.install_signal_handlers()
    server.start()
    server.set_serving()
    server.wait()
    return 0
