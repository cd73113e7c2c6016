"""W3C trace context over gRPC metadata: one SERVER span per RPC, one CLIENT span per call.

Our own small interceptors (no opentelemetry-instrumentation-grpc): the server side
extracts `traceparent`/`tracestate` from the incoming metadata and runs the handler
under a SERVER span; the client side opens a CLIENT span under the caller's current
span and injects it into the outgoing metadata. Streaming responses keep their span
open until the stream ends (finished, failed, cancelled or past its deadline).
"""
from __future__ import annotations

import collections
import contextvars
import threading
from collections.abc import Callable, Iterator

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

# Health probes, reflection and the router's never-ending status subscription would
# each make a span every few seconds (or one that never ends): not traced.
UNTRACED_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/openlora.v1.InferenceWorker/WatchStatus",
)

# OTel RPC conventions: a server marks only these as its own errors (the others,
# NOT_FOUND, INVALID_ARGUMENT..., are the caller's); a client marks every non-OK.
_SERVER_ERRORS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                  grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _end_span(span: trace.Span, code: grpc.StatusCode, is_error: bool, exc: BaseException | None = None) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if is_error:
        span.set_status(Status(StatusCode.ERROR, code.name))
        if exc is not None and code is grpc.StatusCode.UNKNOWN:  # an unexpected exception, not an abort
            span.record_exception(exc)
    span.end()


def _server_code(context: grpc.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    code = context.code()  # set by context.abort / set_code; None when the handler left it alone
    if code is not None:
        return code
    return grpc.StatusCode.UNKNOWN if exc is not None else grpc.StatusCode.OK


def _end_server_span(span: trace.Span, context: grpc.ServicerContext, exc: BaseException | None) -> None:
    code = _server_code(context, exc)
    _end_span(span, code, code in _SERVER_ERRORS, exc)


class _TracedResponses:
    """A streaming response iterated under its span; the span ends when the stream does.

    A handler's generator shares the context of whoever calls next(): each next() runs
    in one private contextvars.Context holding the span, so what the generator makes
    current (`with span(...)` across a yield) stays current between its yields and
    nothing leaks into the gRPC thread, even when a client cancels mid-stream.
    """

    def __init__(self, responses, span: trace.Span, context: grpc.ServicerContext,
                 run_context: contextvars.Context):
        self._responses: Iterator = iter(responses)
        self._span = span
        self._context = context
        self._run_context = run_context
        self._lock = threading.Lock()
        self._ended = False
        context.add_callback(self._on_rpc_done)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return self._run_context.run(next, self._responses)
        except StopIteration:
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise

    def _claim_end(self) -> bool:
        """True for the first caller only: the stream's end and the RPC's end may race."""
        with self._lock:
            first, self._ended = not self._ended, True
        return first

    def _end(self, exc: BaseException | None) -> None:
        if self._claim_end():
            _end_server_span(self._span, self._context, exc)

    def _on_rpc_done(self) -> None:
        """RPC terminated before the stream ended: the client cancelled or the deadline passed."""
        if not self._claim_end():
            return
        code = self._context.code() or ended_early_code(self._context)
        _end_span(self._span, code, code in _SERVER_ERRORS)


def ended_early_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """Why an RPC ended before its handler did: DEADLINE_EXCEEDED or CANCELLED.

    The client's deadline and the server's copy of it run on different clocks, and the
    server may see the call end a few ms before its own copy expires: count an RPC with
    almost no time left (< 50 ms) as expired.
    """
    remaining = context.time_remaining()
    expired = remaining is not None and remaining < 0.05
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


_HANDLER_FACTORIES = {  # (request_streaming, response_streaming) -> (handler attribute, factory)
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class ServerTracingInterceptor(grpc.ServerInterceptor):
    """Continues the caller's trace: a SERVER span per RPC, current while the handler runs.

    tracer: None uses the global tracer provider (set by setup_telemetry).
    """

    def __init__(self, tracer: trace.Tracer | None = None, untraced: tuple[str, ...] = UNTRACED_METHODS):
        self._tracer = tracer or trace.get_tracer("openlora")
        self._untraced = untraced

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._untraced):
            return handler
        attr, factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
        parent = propagate.extract(dict(handler_call_details.invocation_metadata or ()))
        traced = self._wrap(getattr(handler, attr), method, parent, handler.response_streaming)
        return factory(traced, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _wrap(self, behavior: Callable, method: str, parent, response_streaming: bool) -> Callable:
        def traced(request, context):
            span = self._tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER,
                                           attributes=_rpc_attributes(method))
            if response_streaming:
                run_context = contextvars.copy_context()
                try:
                    responses = run_context.run(_call_under, span, behavior, request, context)
                except BaseException as exc:
                    _end_server_span(span, context, exc)
                    raise
                return _TracedResponses(responses, span, context, run_context)
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                response = behavior(request, context)
            except BaseException as exc:
                _end_server_span(span, context, exc)
                raise
            finally:
                otel_context.detach(token)
            _end_server_span(span, context, None)
            return response
        return traced


def _call_under(span: trace.Span, behavior: Callable, request, context):
    """Run inside a private Context: make `span` current there for good, then call."""
    otel_context.attach(trace.set_span_in_context(span))
    return behavior(request, context)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class ClientTracingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                               grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """A CLIENT span per call, child of the current span, injected as W3C metadata.

    The span ends when the call does (for a stream: its last message, error or cancel).
    """

    def __init__(self, tracer: trace.Tracer | None = None, untraced: tuple[str, ...] = UNTRACED_METHODS):
        self._tracer = tracer or trace.get_tracer("openlora")
        self._untraced = untraced

    def _intercept(self, continuation, details, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.startswith(self._untraced):
            return continuation(details, request)
        span = self._tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT,
                                       attributes=_rpc_attributes(method))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [*(details.metadata or ()), *carrier.items()]
        new_details = _CallDetails(method, details.timeout, metadata, details.credentials,
                                   getattr(details, "wait_for_ready", None), getattr(details, "compression", None))
        try:
            call = continuation(new_details, request)
        except BaseException as exc:
            _end_span(span, grpc.StatusCode.UNKNOWN, True, exc)
            raise

        def done(finished_call) -> None:
            code = finished_call.code() or grpc.StatusCode.UNKNOWN
            _end_span(span, code, code is not grpc.StatusCode.OK)

        call.add_done_callback(done)  # runs at once when the call already finished (blocking unary)
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._intercept(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._intercept(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._intercept(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self._intercept(continuation, client_call_details, request_iterator)


def traced_channel(channel: grpc.Channel, tracer: trace.Tracer | None = None,
                   untraced: tuple[str, ...] = UNTRACED_METHODS) -> grpc.Channel:
    """`channel` with trace propagation: calls made through it continue the current trace."""
    return grpc.intercept_channel(channel, ClientTracingInterceptor(tracer, untraced))
