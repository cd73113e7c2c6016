"""An in-process fake InferenceWorker: scripted tokens, a settable status, observable contexts."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc

from protos import generate_pb2, inference_worker_pb2, inference_worker_pb2_grpc
from services.config import ServerConfig
from services.server import GrpcServer

SERVICE = inference_worker_pb2.DESCRIPTOR.services_by_name["InferenceWorker"].full_name


@dataclass
class Call:
    request: generate_pb2.GenerateRequest
    time_remaining: float
    cancelled: threading.Event = field(default_factory=threading.Event)


class FakeWorker(inference_worker_pb2_grpc.InferenceWorkerServicer):
    """`tokens` messages "t0 ", "t1 "...; `gate` (if set) holds every token after the first;
    `fail_before_first` / `fail_after_first` abort with that code; `forever` streams until cancelled."""

    def __init__(self, worker_id: str, tokens: int = 3):
        self.worker_id = worker_id
        self.tokens = tokens
        self.gate: threading.Event | None = None
        self.fail_before_first: grpc.StatusCode | None = None
        self.fail_after_first: grpc.StatusCode | None = None
        self.forever = False
        self.calls: list[Call] = []
        self._status = inference_worker_pb2.WorkerStatus(worker_id=worker_id, free_adapter_slots=4,
                                                         total_adapter_slots=4, kv_blocks_total=100)
        self._changed = threading.Condition()
        self._version = 0
        self._stopping = False
        self.server: GrpcServer | None = None

    # --- the server --------------------------------------------------------
    def start(self, port: int = 0) -> FakeWorker:
        self._stopping = False
        self.server = GrpcServer(ServerConfig(f"127.0.0.1:{port}", grace_s=0),
                                 [(inference_worker_pb2_grpc.add_InferenceWorkerServicer_to_server, self)],
                                 [SERVICE])
        self.port = self.server.start()
        self.server.set_serving()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self.server.stop(0)

    def set_status(self, **fields) -> None:
        with self._changed:
            for name, value in fields.items():
                if isinstance(value, list):
                    getattr(self._status, name)[:] = value
                else:
                    setattr(self._status, name, value)
            self._version += 1
            self._changed.notify_all()

    # --- the service -------------------------------------------------------
    def Generate(self, request, context):
        call = Call(request, context.time_remaining())
        context.add_callback(call.cancelled.set)
        self.calls.append(call)
        if self.fail_before_first is not None:
            context.abort(self.fail_before_first, f"{self.worker_id} refuses")
        i = 0
        while self.forever or i < self.tokens:
            if i == 1 and self.fail_after_first is not None:
                context.abort(self.fail_after_first, f"{self.worker_id} broke")
            if i > 0 and self.gate is not None:
                self.gate.wait(30)
            if self.forever and call.cancelled.wait(0.02):
                return
            last = not self.forever and i == self.tokens - 1
            yield generate_pb2.GenerateResponse(
                request_id=request.request_id, text=f"t{i} ", token_ids=[i],
                finish_reason=generate_pb2.FINISH_REASON_LENGTH if last else 0)
            i += 1

    def _snapshot(self) -> inference_worker_pb2.WorkerStatus:
        status = inference_worker_pb2.WorkerStatus()
        status.CopyFrom(self._status)
        return status

    def GetStatus(self, request, context):
        with self._changed:
            return self._snapshot()

    def WatchStatus(self, request, context):
        seen = -1
        while context.is_active():
            with self._changed:
                self._changed.wait_for(lambda seen=seen: self._version != seen or self._stopping, timeout=0.2)
                if self._stopping:
                    return
                if self._version == seen:
                    continue
                seen = self._version
                status = self._snapshot()
            yield status
