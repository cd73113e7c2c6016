"""A live view of every worker, kept by one WatchStatus stream per worker.

Each worker has a background thread: health check (grpc.health.v1), then
WatchStatus; every status updates the view. When the stream breaks the worker is
DOWN (no new requests) until a health check and a new stream succeed; reconnects
back off exponentially with jitter, so a dead worker costs little and many
routers don't reconnect in lockstep.

The view also counts what this router sent: a status is up to one interval old,
so a burst arriving between two statuses would otherwise all see the same idle
worker and land on it. Only requests still open count: a worker reports on change
and polls, so one that starts and ends between two polls never shows in a status
and must not be counted forever. Likewise an adapter (or merge recipe) sent to a
worker recently counts as resident there: its load may take longer than a status
interval, and the router's merge keys never appear in a status at all.
"""
from __future__ import annotations

import enum
import itertools
import logging
import random
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import inference_worker_pb2, inference_worker_pb2_grpc
from router import policy
from router.config import RouterConfig
from services.channels import CHANNEL_OPTIONS
from services.telemetry import Telemetry, global_telemetry

log = logging.getLogger(__name__)

# gRPC's own reconnect backoff grows to 120 s; a worker that restarts must be seen
# again within our own (much shorter) backoff, so cap the channel's too.
_WORKER_CHANNEL_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class State(enum.Enum):
    UNKNOWN = "unknown"     # no status yet: tried only when no worker is UP
    UP = "up"
    DOWN = "down"


class _NotServing(Exception):
    pass


def backoff_s(failures: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with jitter in [0.5, 1.0] of the capped delay."""
    delay = min(max_s, initial_s * 2 ** max(failures - 1, 0))
    return delay * random.uniform(0.5, 1.0)


class WorkerConnection:
    """One worker: its channel (status stream and proxied requests share it) and what we know."""

    def __init__(self, address: str, view: WorkerView):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=_WORKER_CHANNEL_OPTIONS)
        # proxied requests continue the client's trace (health and WatchStatus are not traced)
        self.stub = inference_worker_pb2_grpc.InferenceWorkerStub(view.telemetry.traced_channel(self.channel))
        self._view = view
        self.state = State.UNKNOWN
        self.status: inference_worker_pb2.WorkerStatus | None = None
        self.last_seen = 0.0                # time.monotonic() of the last status
        self.open_requests: dict[int, float] = {}   # this router's requests on it: ticket -> sent at
        self.recent_keys: dict[str, float] = {}     # routing key -> last sent at
        self.retired = False                # removed by discovery; channel closes when idle
        self._stop = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._watch, name=f"watch-{address}", daemon=True)

    @property
    def worker_id(self) -> str:
        return (self.status.worker_id if self.status else "") or self.address

    def load(self, now: float, affinity_ttl_s: float) -> policy.WorkerLoad:
        """For the policy; called under the view's lock (DOWN workers are never asked)."""
        for key in [k for k, sent_at in self.recent_keys.items() if now - sent_at > affinity_ttl_s]:
            del self.recent_keys[key]
        s = self.status
        if s is None:
            return policy.WorkerLoad(self.address, num_requests=len(self.open_requests), is_known=False)
        sent_since = sum(1 for sent_at in self.open_requests.values() if sent_at > self.last_seen)
        # max(): a status may predate requests we sent just before it arrived
        num = max(s.running_requests + s.waiting_requests + sent_since, len(self.open_requests))
        return policy.WorkerLoad(
            self.address, num_requests=num,
            kv_used_frac=s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0,
            gpu_adapters=frozenset(s.gpu_adapters).union(self.recent_keys),
            free_adapter_slots=s.free_adapter_slots)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)

    def _check_health(self, timeout_s: float) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise _NotServing(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def _watch(self) -> None:
        cfg = self._view.config
        failures = 0
        while not self._stop.is_set():
            reason = "status stream ended"
            try:
                self._check_health(cfg.health_timeout_s)
                self._call = self.stub.WatchStatus(
                    inference_worker_pb2.WatchStatusRequest(interval_ms=cfg.status_interval_ms))
                if self._stop.is_set():
                    self._call.cancel()
                for status in self._call:
                    self._view._on_status(self, status)
                    failures = 0
            except grpc.RpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except _NotServing as exc:
                reason = f"health {exc}"
            if self._stop.is_set():
                return
            failures += 1
            self._view._on_down(self, reason)
            self._stop.wait(backoff_s(failures, cfg.reconnect_initial_s, cfg.reconnect_max_s))


class WorkerView:
    """All workers the router knows, their state, and the choice of one per request."""

    def __init__(self, config: RouterConfig, telemetry: Telemetry | None = None):
        self.config = config
        self.telemetry = telemetry or global_telemetry()
        self._lock = threading.Condition()
        self._workers: dict[str, WorkerConnection] = {}
        self._tickets = itertools.count()

    def set_addresses(self, addresses: list[str]) -> None:
        """Discovery's callback: watch new workers, retire those gone."""
        with self._lock:
            added = [WorkerConnection(a, self) for a in addresses if a not in self._workers]
            removed = [c for a, c in self._workers.items() if a not in addresses]
            for conn in added:
                self._workers[conn.address] = conn
            for conn in removed:
                del self._workers[conn.address]
                conn.retired = True
        for conn in added:
            conn.start()
        for conn in removed:
            conn.stop()
            self._close_if_idle(conn)

    def pick(self, key: str | None, exclude: list[str], salt: str = "") -> tuple[WorkerConnection, int] | None:
        """The best worker not in `exclude` and a ticket for release(), or None.

        Counts the request on the worker until released."""
        with self._lock:
            candidates = {a: c for a, c in self._workers.items() if a not in exclude
                          and c.state != State.DOWN and not (c.status and c.status.draining)}
            now = time.monotonic()
            loads = [c.load(now, self.config.affinity_ttl_s) for c in candidates.values()]
            ranked = policy.rank(key, loads, self.config.load_factor, self.config.min_load_bound, salt)
            if not ranked:
                return None
            conn = candidates[ranked[0].address]
            ticket = next(self._tickets)
            conn.open_requests[ticket] = now
            if key:
                conn.recent_keys[key] = now
            return conn, ticket

    def release(self, conn: WorkerConnection, ticket: int) -> None:
        with self._lock:
            del conn.open_requests[ticket]
        self._close_if_idle(conn)

    def _close_if_idle(self, conn: WorkerConnection) -> None:
        with self._lock:
            close = conn.retired and not conn.open_requests
        if close:
            conn.channel.close()

    def _on_status(self, conn: WorkerConnection, status) -> None:
        with self._lock:
            if conn.state != State.UP:
                log.info("worker %s (%s) is up", status.worker_id, conn.address)
            conn.status, conn.state = status, State.UP
            conn.last_seen = time.monotonic()
            self._lock.notify_all()

    def _on_down(self, conn: WorkerConnection, reason: str) -> None:
        with self._lock:
            if conn.state != State.DOWN:
                log.warning("worker %s is down: %s", conn.address, reason)
            conn.state = State.DOWN

    def wait_until_any_up(self, timeout_s: float) -> bool:
        with self._lock:
            return self._lock.wait_for(
                lambda: any(c.state == State.UP for c in self._workers.values()), timeout_s)

    def snapshot(self) -> list[tuple[str, bool, object, float]]:
        """(address, healthy, last status or None, seconds since it) per worker."""
        now = time.monotonic()
        with self._lock:
            return [(c.address, c.state == State.UP, c.status,
                     now - c.last_seen if c.status is not None else 0.0)
                    for c in self._workers.values()]

    def stop(self) -> None:
        with self._lock:
            conns = list(self._workers.values())
            self._workers.clear()
        for conn in conns:
            conn.stop()
            conn.channel.close()
