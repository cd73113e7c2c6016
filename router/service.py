"""RouterServicer: picks a worker per request and proxies its token stream.

Each response message is forwarded as soon as it arrives (no buffering). A
request may move to another worker only before its first token: after that the
client has seen output and a retry would repeat or change it. The client's
cancellation cancels the upstream call, and the upstream call carries the
client's remaining deadline, so an abandoned request frees the worker at once.
The router keeps no state of its own beyond the live worker view.
"""
from __future__ import annotations

import logging
import time
import uuid

import grpc

from protos import router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.routing_key import routing_key
from router.worker_view import WorkerView
from services.config import WORKER_METADATA_KEY
from services.errors import Unavailable, from_rpc_error, grpc_errors
from services.metrics import Metrics, adapter_ref
from services.server import Intake
from services.telemetry import count_request, global_telemetry

log = logging.getLogger(__name__)

# Before the first token these mean "this worker cannot take it now", not "the
# request is bad": another worker may serve it.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

_NO_DEADLINE_S = 1e7   # grpc reports "no deadline" as a huge time remaining


def _remaining_s(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, view: WorkerView, config: RouterConfig, metrics: Metrics | None = None):
        self.view = view
        self.config = config
        self.metrics = metrics or global_telemetry().metrics
        self.intake = Intake("router")        # Generate calls: a drain refuses new ones, waits for the rest

    @grpc_errors
    def Generate(self, request, context):
        adapter = adapter_ref(request)
        yield from count_request(self.metrics, adapter, context, self._generate(request, context, adapter))

    def _generate(self, request, context, adapter: str):
        with self.intake.admit():
            yield from self._route(request, context, adapter)

    def _route(self, request, context, adapter: str):
        arrived = time.monotonic()
        key = routing_key(request)
        salt = request.request_id or uuid.uuid4().hex
        tried: list[str] = []
        failures: list[str] = []
        for _ in range(self.config.max_attempts):
            picked = self.view.pick(key, exclude=tried, salt=salt)
            if picked is None:
                break
            conn, ticket = picked
            tried.append(conn.address)
            try:
                call = conn.stub.Generate(request, timeout=_remaining_s(context))
                context.add_callback(call.cancel)
                try:
                    first = next(call, None)
                except grpc.RpcError as exc:
                    if exc.code() in RETRYABLE and context.is_active():
                        self.metrics.request_retried(adapter, exc.code().name)
                        failures.append(f"{conn.worker_id} ({conn.address}): {exc.code().name}: {exc.details()}")
                        log.info("retrying elsewhere: %s", failures[-1])
                        continue
                    raise
                worker_id = (first.worker_id if first is not None else "") or conn.worker_id
                context.send_initial_metadata(((WORKER_METADATA_KEY, worker_id),))
                if first is not None and first.token_ids:   # the client's view: arrival here -> first token
                    self.metrics.time_to_first_token(adapter, time.monotonic() - arrived)
                yield from self._forward(first, call, worker_id)
                return
            finally:
                self.view.release(conn, ticket)
        what = f"adapter {key!r}" if key else "the base model"
        detail = "; ".join(failures) if failures else "no healthy worker known"
        raise Unavailable(f"no worker can serve {what} now ({detail})")

    @staticmethod
    def _forward(first, call, worker_id: str):
        try:
            message = first
            while message is not None:
                if not message.worker_id:
                    message.worker_id = worker_id
                yield message
                message = next(call, None)
        except grpc.RpcError as exc:
            # After the first token the stream cannot move: end it with the worker's status.
            raise type(from_rpc_error(exc))(f"worker {worker_id}: {exc.details()}") from exc

    @grpc_errors
    def ListWorkers(self, request, context):
        reply = router_pb2.ListWorkersResponse()
        for address, healthy, status, ago_s in self.view.snapshot():
            info = reply.workers.add(address=address, healthy=healthy,
                                     last_seen_ago_ms=ago_s * 1000.0)
            if status is not None:
                info.status.CopyFrom(status)
        return reply
