"""InferenceWorker gRPC servicer: the RPC flow around the engine and the adapter tiers.

Generate hands an EngineRequest to the engine; the engine thread calls on_output,
which only puts into this request's queue (with --stream-interval N, one merged output
per N tokens: inference_worker/stream_batch.py); the RPC thread drains the queue into
the stream. When the RPC ends early (client cancel, deadline, server stop) the
request is aborted at once, so its KV blocks and adapter slot are freed.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
import uuid

from inference_worker.interfaces import AdapterSource, Engine, EngineRequest
from inference_worker.observe import record_finished, record_gpu_lookup
from inference_worker.protocol import (
    prompt_ids_from_proto,
    recipe_from_proto,
    response_from_output,
    sampling_from_proto,
)
from inference_worker.stream_batch import StreamBatcher
from protos import inference_worker_pb2 as pb
from protos import inference_worker_pb2_grpc
from services.errors import DeadlineExceeded, InvalidArgument, OpenLoRAError, grpc_errors
from services.metrics import adapter_ref
from services.server import Intake
from services.telemetry import Telemetry, count_request, current_context, global_telemetry

POLL_S = 0.25                 # how often a waiting stream checks that its client is still there
MAX_LOAD_WAIT_S = 600.0       # LoadAdapter without a deadline still ends
DEFAULT_WATCH_MS, MIN_WATCH_MS = 200, 20


class InferenceWorkerServicer(inference_worker_pb2_grpc.InferenceWorkerServicer):
    def __init__(self, engine: Engine, adapters: AdapterSource, *, worker_id: str, base_model: str,
                 device: str, address: str = "", telemetry: Telemetry | None = None, stream_interval: int = 1):
        """stream_interval: tokens per streamed message (inference_worker/stream_batch.py)."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self._stream_interval = stream_interval
        self._engine = engine
        self._tel = telemetry or global_telemetry()
        self._adapters = adapters
        self.worker_id = worker_id            # set again once the port is known
        self.address = address
        self._base_model = base_model
        self._device = device
        self.intake = Intake("worker")        # Generate calls: a drain refuses new ones, waits for the rest

    def drain(self) -> None:
        """Refuse new Generate calls (UNAVAILABLE); running ones finish; watchers get a last status."""
        self.intake.drain()

    # --- Generate --------------------------------------------------------------------------
    @grpc_errors
    def Generate(self, request, context):
        adapter = adapter_ref(request)
        yield from count_request(self._tel.metrics, adapter, context, self._generate(request, context, adapter))

    def _generate(self, request, context, adapter: str):
        with self.intake.admit():
            yield from self._run(request, context, adapter)

    def _run(self, request, context, adapter: str):
        rid = request.request_id or uuid.uuid4().hex
        outputs: queue.Queue = queue.Queue()
        on_output = outputs.put if self._stream_interval == 1 else StreamBatcher(outputs.put, self._stream_interval)
        engine_request = self._engine_request(request, rid, on_output)
        # the request's trace and wall-clock arrival: its phases become spans once it ends
        trace_context = current_context()
        arrival_ns = time.time_ns() - int((time.monotonic() - engine_request.arrival_time) * 1e9)
        if request.adapter:
            record_gpu_lookup(self._tel.metrics, self._engine, request.adapter)
        added, finished = threading.Event(), threading.Event()

        def abort_unless_finished():
            if added.is_set() and not finished.is_set():
                self._engine.abort_request(rid)
        try:
            self._engine.add_request(engine_request)
            added.set()
            # fires on cancel, deadline or server stop (and harmlessly on a normal end)
            if not context.add_callback(abort_unless_finished):
                return                        # already over: the finally aborts
            sent_tokens = False
            while True:
                try:
                    out = outputs.get(timeout=POLL_S)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if out.finished or out.finish_reason == "error":
                    finished.set()                # the engine is done with it: nothing to abort
                    record_finished(self._tel, out, adapter=adapter, request_id=rid,
                                    context=trace_context, arrival_ns=arrival_ns)
                if out.finish_reason == "error":
                    raise out.error or OpenLoRAError("engine error")
                yield response_from_output(out, rid, self.worker_id, self._engine.tokenizer,
                                           is_first_token=bool(out.token_ids) and not sent_tokens)
                sent_tokens = sent_tokens or bool(out.token_ids)
                if out.finished:
                    return
        finally:
            abort_unless_finished()           # generator closed early (client gone): free at once

    def _engine_request(self, request, rid: str, on_output) -> EngineRequest:
        if request.adapter and request.merge.adapters:
            raise InvalidArgument("give adapter or merge, not both")
        return EngineRequest(
            request_id=rid,
            prompt_token_ids=prompt_ids_from_proto(request, self._engine.tokenizer),
            sampling=sampling_from_proto(request.sampling),
            adapter=request.adapter,
            merge=recipe_from_proto(request.merge) if request.merge.adapters else None,
            on_output=on_output,
            arrival_time=time.monotonic(),
        )

    # --- adapters ----------------------------------------------------------------------------
    @grpc_errors
    def LoadAdapter(self, request, context):
        if not request.adapter:
            raise InvalidArgument("adapter is required")
        t0 = time.monotonic()
        remaining = context.time_remaining()
        deadline = t0 + min(MAX_LOAD_WAIT_S if remaining is None else remaining, MAX_LOAD_WAIT_S)
        ticket = self._adapters.request(request.adapter)
        if not ticket.wait(max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded(f"adapter {request.adapter} is still loading")
        if ticket.error() is not None:
            raise ticket.error()
        was_on_gpu = ticket.key in self._engine.stats().gpu_adapters
        try:
            self._engine.pin_adapter(ticket, pin=request.pin).result(max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise DeadlineExceeded(f"adapter {ticket.key} is still loading onto the device") from None
        return pb.LoadAdapterResponse(adapter_key=ticket.key, load_ms=(time.monotonic() - t0) * 1000.0,
                                      tier="gpu" if was_on_gpu else getattr(ticket, "tier", ""))

    @grpc_errors
    def UnloadAdapter(self, request, context):
        """ "name@version" or a merge key unpins that key; a bare "name" every version on the device."""
        ref = request.adapter
        if not ref:
            raise InvalidArgument("adapter is required")
        if "@" in ref or ref.startswith("merge:"):
            keys = [ref]
        else:
            keys = [k for k in self._engine.stats().gpu_adapters if k.rpartition("@")[0] == ref]
        results = [self._engine.unpin_adapter(key) for key in keys]
        return pb.UnloadAdapterResponse(was_loaded=any(results))

    # --- status ------------------------------------------------------------------------------
    @grpc_errors
    def GetStatus(self, request, context):
        return self.status()

    @grpc_errors
    def WatchStatus(self, request, context):
        interval_s = max(request.interval_ms or DEFAULT_WATCH_MS, MIN_WATCH_MS) / 1000.0
        last = None
        while context.is_active():
            status = self.status()
            if status != last:
                yield status
                last = status
            if status.draining:
                return                        # the last message says so; the server is stopping
            self.intake.draining.wait(interval_s)   # wakes at once on drain

    def status(self) -> pb.WorkerStatus:
        stats = self._engine.stats()
        return pb.WorkerStatus(
            worker_id=self.worker_id, base_model=self._base_model,
            gpu_adapters=sorted(stats.gpu_adapters), cpu_adapters=sorted(self._adapters.cpu_resident()),
            free_adapter_slots=stats.free_adapter_slots, total_adapter_slots=stats.total_adapter_slots,
            running_requests=stats.running_requests, waiting_requests=stats.waiting_requests,
            kv_blocks_used=stats.kv_blocks_used, kv_blocks_total=stats.kv_blocks_total,
            draining=self.intake.draining.is_set(), device=self._device, address=self.address)
