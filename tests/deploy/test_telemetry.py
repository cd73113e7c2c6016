"""Trace context crosses gRPC: client -> A -> B spans form one trace with the right parents."""
from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.channels import insecure_channel
from services.config import ServerConfig
from services.server import GrpcServer
from services.telemetry import TelemetryConfig, setup_telemetry
from tests.deploy.util import wait_until


def _generic(service: str, methods: dict) -> tuple:
    """A registration for GrpcServer: a generic handler of raw-bytes methods."""
    handler = grpc.method_handlers_generic_handler(service, methods)
    return (lambda h, server: server.add_generic_rpc_handlers((h,)), handler)


def _start(tel, service: str, methods: dict) -> GrpcServer:
    server = GrpcServer(ServerConfig("127.0.0.1:0", max_workers=8), [_generic(service, methods)], [service],
                        interceptors=[tel.server_interceptor()])
    server.start()
    server.set_serving()
    return server


@pytest.fixture
def traced_pair():
    """Server B (unary, stream, failing, cancellable stream) and server A, which calls B."""
    exporter = InMemorySpanExporter()
    tel = {name: setup_telemetry(name, TelemetryConfig(), span_exporter=exporter, set_global=False)
           for name in ("client", "svc-a", "svc-b")}
    release = threading.Event()

    def slow(request, context):
        yield b"first"
        release.wait(10)  # bounded: the test cancels, then releases
        yield b"late"

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such adapter")

    b = _start(tel["svc-b"], "test.B", {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req + b"!"),
        "Stream": grpc.unary_stream_rpc_method_handler(lambda req, ctx: iter([req, req])),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_stream_rpc_method_handler(slow),
    })
    to_b = tel["svc-a"].traced_channel(insecure_channel(b.address))

    def relay(request, context):
        # a generator handler: its body runs while gRPC iterates, under A's SERVER span
        with tel["svc-a"].span("work", adapter="demo", absent=None):
            yield to_b.unary_unary("/test.B/Unary")(request, timeout=10)
            yield from to_b.unary_stream("/test.B/Stream")(request, timeout=10)

    a = _start(tel["svc-a"], "test.A", {"Relay": grpc.unary_stream_rpc_method_handler(relay)})
    yield exporter, tel, a, b
    release.set()
    to_b.close()
    for server in (a, b):
        server.stop()


def _by_name(spans, name, kind):
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, f"{name} {kind}: {[(s.name, s.kind) for s in spans]}"
    return found[0]


def test_one_trace_across_two_servers(traced_pair):
    exporter, tel, a, _b = traced_pair
    with insecure_channel(a.address) as raw, tel["client"].span("request") as root:
        replies = list(tel["client"].traced_channel(raw).unary_stream("/test.A/Relay")(b"hi", timeout=10))
    assert replies == [b"hi!", b"hi", b"hi"]
    assert wait_until(lambda: len(exporter.get_finished_spans()) >= 7)
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {root.get_span_context().trace_id}

    client_call = _by_name(spans, "test.A/Relay", SpanKind.CLIENT)
    a_server = _by_name(spans, "test.A/Relay", SpanKind.SERVER)
    work = _by_name(spans, "work", SpanKind.INTERNAL)
    a_unary = _by_name(spans, "test.B/Unary", SpanKind.CLIENT)
    b_unary = _by_name(spans, "test.B/Unary", SpanKind.SERVER)
    a_stream = _by_name(spans, "test.B/Stream", SpanKind.CLIENT)
    b_stream = _by_name(spans, "test.B/Stream", SpanKind.SERVER)
    assert client_call.parent.span_id == root.get_span_context().span_id
    assert a_server.parent.span_id == client_call.context.span_id
    assert a_server.parent.is_remote and b_unary.parent.is_remote
    assert work.parent.span_id == a_server.context.span_id
    assert a_unary.parent.span_id == work.context.span_id
    assert a_stream.parent.span_id == work.context.span_id
    assert b_unary.parent.span_id == a_unary.context.span_id
    assert b_stream.parent.span_id == a_stream.context.span_id

    # each span is reported by the service that made it
    assert a_server.resource.attributes["service.name"] == "svc-a"
    assert b_stream.resource.attributes["service.name"] == "svc-b"
    assert client_call.resource.attributes["service.name"] == "client"
    # the streaming server span covers its whole stream, the relay covers B's calls
    assert a_server.start_time <= b_unary.start_time and b_stream.end_time <= a_server.end_time
    assert b_stream.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert b_stream.attributes["rpc.service"] == "test.B" and b_stream.attributes["rpc.method"] == "Stream"
    assert work.attributes["adapter"] == "demo" and "absent" not in work.attributes


def test_error_status_on_client_not_on_server(traced_pair):
    exporter, tel, _a, b = traced_pair
    with insecure_channel(b.address) as raw, pytest.raises(grpc.RpcError) as err:
        tel["client"].traced_channel(raw).unary_unary("/test.B/Fail")(b"x", timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert wait_until(lambda: len(exporter.get_finished_spans()) >= 2)
    spans = exporter.get_finished_spans()
    client, server = _by_name(spans, "test.B/Fail", SpanKind.CLIENT), _by_name(spans, "test.B/Fail", SpanKind.SERVER)
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    assert client.attributes["rpc.grpc.status_code"] == server.attributes["rpc.grpc.status_code"] == not_found
    assert client.status.status_code == StatusCode.ERROR  # a caller's failure...
    assert server.status.status_code != StatusCode.ERROR  # ...not the server's (OTel RPC conventions)


@pytest.mark.parametrize("how, expected", [("cancel", grpc.StatusCode.CANCELLED),
                                            ("deadline", grpc.StatusCode.DEADLINE_EXCEEDED)])
def test_stream_ended_early_ends_its_span(traced_pair, caplog, how, expected):
    exporter, tel, _a, b = traced_pair
    with insecure_channel(b.address) as raw:
        # the handler blocks after its first message (up to 10 s): the deadline passes first
        call = tel["client"].traced_channel(raw).unary_stream("/test.B/Slow")(
            b"x", timeout=10 if how == "cancel" else 1)
        assert next(call) == b"first"
        if how == "cancel":
            call.cancel()
        assert wait_until(lambda: len(exporter.get_finished_spans()) >= 2)
    spans = exporter.get_finished_spans()
    assert _by_name(spans, "test.B/Slow", SpanKind.SERVER).attributes["rpc.grpc.status_code"] == expected.value[0]
    assert _by_name(spans, "test.B/Slow", SpanKind.CLIENT).attributes["rpc.grpc.status_code"] == expected.value[0]
    # nothing was left attached to a gRPC thread ("Failed to detach context")
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry") and r.levelno >= 40]


def test_health_checks_are_not_traced(traced_pair):
    exporter, tel, _a, b = traced_pair
    with insecure_channel(b.address) as raw:
        stub = health_pb2_grpc.HealthStub(tel["client"].traced_channel(raw))
        reply = stub.Check(health_pb2.HealthCheckRequest(service="test.B"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert exporter.get_finished_spans() == ()


def test_sampling_ratio_zero_keeps_context_but_records_nothing():
    exporter = InMemorySpanExporter()
    tel = setup_telemetry("svc", TelemetryConfig(trace_sample=0.0), span_exporter=exporter, set_global=False)
    with tel.span("dropped") as span:
        assert span.get_span_context().is_valid and not span.is_recording()
    assert exporter.get_finished_spans() == ()
    tel.shutdown()


def test_config_from_env():
    cfg = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
                                    "OPENLORA_METRICS_PORT": "9464", "OPENLORA_TRACE_SAMPLE": "0.25"})
    assert (cfg.otlp_endpoint, cfg.metrics_port, cfg.trace_sample) == ("http://collector:4317", 9464, 0.25)
    assert TelemetryConfig.from_env({}) == TelemetryConfig()
    with pytest.raises(ValueError):
        TelemetryConfig.from_env({"OPENLORA_TRACE_SAMPLE": "2"})
    with pytest.raises(ValueError):
        TelemetryConfig(metrics_port=70000)
