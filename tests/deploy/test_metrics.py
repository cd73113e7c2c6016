"""Metrics: recorded values read back in-process, over the Prometheus endpoint, and over OTLP."""
from __future__ import annotations

import re
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.metrics import Metrics
from services.telemetry import TelemetryConfig, setup_telemetry


def _points(reader: InMemoryMetricReader) -> dict[str, list]:
    data = reader.get_metrics_data()
    return {metric.name: list(metric.data.data_points)
            for rm in data.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics}


def _point(points: dict, name: str, **labels):
    matching = [p for p in points[name] if dict(p.attributes) == labels]
    assert len(matching) == 1, (name, labels, [dict(p.attributes) for p in points[name]])
    return matching[0]


def _record_a_few(m: Metrics) -> None:
    for code in ("OK", "OK", "NOT_FOUND"):
        m.request_finished("sql-expert", code)
    m.request_finished("", "OK")
    m.tokens("sql-expert", prompt=12, output=5)
    m.tokens("sql-expert", prompt=3, output=0)
    m.time_to_first_token("sql-expert", 0.2)
    m.time_to_first_token("sql-expert", 0.4)
    m.time_per_output_token("sql-expert", 0.015)
    m.adapter_load("store", "miss", "sql-expert", seconds=0.3)
    m.adapter_load("gpu", "hit", "sql-expert")
    m.adapter_load("cpu", "evict", "other")
    m.engine_state(queue_depth=4, running=2, kv_cache_usage=0.5)
    m.engine_state(queue_depth=1, running=3, kv_cache_usage=0.25)
    m.store_bytes("upload", 1000, adapter="sql-expert")
    m.store_bytes("download", 250)
    m.store_error("UploadAdapter", "INVALID_ARGUMENT")


def test_instruments_read_back():
    reader = InMemoryMetricReader()
    tel = setup_telemetry("worker", TelemetryConfig(), metric_readers=[reader], set_global=False)
    _record_a_few(tel.metrics)
    p = _points(reader)
    assert _point(p, "openlora.requests", adapter="sql-expert", code="OK").value == 2
    assert _point(p, "openlora.requests", adapter="sql-expert", code="NOT_FOUND").value == 1
    assert _point(p, "openlora.requests", adapter="base", code="OK").value == 1
    assert _point(p, "openlora.prompt_tokens", adapter="sql-expert").value == 15
    assert _point(p, "openlora.output_tokens", adapter="sql-expert").value == 5
    ttft = _point(p, "openlora.time_to_first_token", adapter="sql-expert")
    assert ttft.count == 2 and ttft.sum == pytest.approx(0.6)
    assert _point(p, "openlora.time_per_output_token", adapter="sql-expert").count == 1
    assert _point(p, "openlora.adapter.loads", tier="store", result="miss", adapter="sql-expert").value == 1
    assert _point(p, "openlora.adapter.loads", tier="cpu", result="evict", adapter="other").value == 1
    assert _point(p, "openlora.adapter.load_duration", tier="store").sum == pytest.approx(0.3)
    assert all(set(pt.attributes) == {"tier"} for pt in p["openlora.adapter.load_duration"])
    assert _point(p, "openlora.queue.depth").value == 1  # gauges keep the last value
    assert _point(p, "openlora.batch.running").value == 3
    assert _point(p, "openlora.kv_cache.usage").value == 0.25
    assert _point(p, "openlora.store.bytes", direction="upload", adapter="sql-expert").value == 1000
    assert _point(p, "openlora.store.bytes", direction="download").value == 250
    assert _point(p, "openlora.store.errors", op="UploadAdapter", code="INVALID_ARGUMENT").value == 1
    # a second look shows the counters grew (cumulative), not reset
    tel.metrics.request_finished("sql-expert", "OK")
    assert _point(_points(reader), "openlora.requests", adapter="sql-expert", code="OK").value == 3
    tel.shutdown()


def test_label_values_are_a_closed_set():
    m = Metrics()  # global no-op meter: safe to use before setup_telemetry
    with pytest.raises(ValueError):
        m.adapter_load("ssd", "hit")
    with pytest.raises(ValueError):
        m.adapter_load("gpu", "hot")
    with pytest.raises(ValueError):
        m.store_bytes("sideways", 1)


def test_prometheus_endpoint_serves_them():
    tel = setup_telemetry("router", TelemetryConfig(metrics_port=0, metrics_host="127.0.0.1"), set_global=False)
    try:
        _record_a_few(tel.metrics)
        with urllib.request.urlopen(f"http://127.0.0.1:{tel.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        tel.shutdown()
    assert _sample(text, "openlora_requests_total", adapter="sql-expert", code="OK") == 2
    assert _sample(text, "openlora_output_tokens_total", adapter="sql-expert") == 5
    assert _sample(text, "openlora_time_to_first_token_seconds_count", adapter="sql-expert") == 2
    assert _sample(text, "openlora_time_to_first_token_seconds_bucket", adapter="sql-expert", le="0.25") == 1
    assert _sample(text, "openlora_queue_depth") == 1
    assert _sample(text, "openlora_kv_cache_usage") == 0.25
    assert _sample(text, "target_info", service_name="router") == 1  # the resource


def _sample(text: str, name: str, **labels) -> float:
    """The value of the one sample `name{...labels...}` in a Prometheus text exposition."""
    values = []
    for line in text.splitlines():
        metric, _, rest = line.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest.rpartition("}")[0]))
        if labels.items() <= found.items():
            values.append(float(line.rsplit(" ", 1)[1]))
    assert len(values) == 1, (name, labels, values)
    return values[0]


class _Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """A minimal OTLP/gRPC receiver: keeps what it is sent."""

    def __init__(self):
        self.spans, self.metric_names = [], set()

    def Export(self, request, context):
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metric_names |= {m.name for rm in request.resource_metrics for sm in rm.scope_metrics
                              for m in sm.metrics}
        return metrics_service_pb2.ExportMetricsServiceResponse()


def test_otlp_export_reaches_a_collector():
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tel = setup_telemetry("store", TelemetryConfig(otlp_endpoint=f"http://127.0.0.1:{port}"), set_global=False)
        with tel.span("upload", adapter="sql-expert"):
            tel.metrics.store_bytes("upload", 42)
        tel.shutdown()  # flushes the batch span processor and the last metrics
    finally:
        server.stop(0)
    assert [s.name for s in collector.spans] == ["upload"]
    assert "openlora.store.bytes" in collector.metric_names
