"""OpenTelemetry for every service: traces, metrics, and where they go.

    tel = setup_telemetry("openlora-router")          # config from the environment
    server = GrpcServer(cfg, regs, names, interceptors=[tel.server_interceptor()])
    workers = tel.traced_channel(insecure_channel(address))
    with tel.span("route", adapter=name): ...
    tel.metrics.request_finished(adapter, "OK")
    ...
    tel.shutdown()                                     # flush on exit

Environment (TelemetryConfig.from_env):
    OTEL_EXPORTER_OTLP_ENDPOINT  e.g. http://otel-collector:4317: traces and metrics over OTLP/gRPC
    OPENLORA_METRICS_PORT        Prometheus scrape endpoint (/metrics) on this port (0: any free port)
    OPENLORA_METRICS_HOST        its address (default 0.0.0.0)
    OPENLORA_TRACE_SAMPLE        ratio of new traces kept (default 1.0); a caller's decision is followed
None set: spans still exist in-process (trace ids in the logs, context crosses gRPC)
but nothing leaves the process.
"""
from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from services.errors import status_of
from services.grpc_tracing import (
    ClientTracingInterceptor,
    ServerTracingInterceptor,
    ended_early_code,
    traced_channel,
)
from services.metrics import Metrics

__all__ = [
    "ClientTracingInterceptor",
    "Metrics",
    "ServerTracingInterceptor",
    "Telemetry",
    "TelemetryConfig",
    "count_request",
    "current_context",
    "global_telemetry",
    "record_span",
    "setup_telemetry",
    "span",
    "traced_channel",
]


@dataclass
class TelemetryConfig:
    otlp_endpoint: str = ""            # empty: no OTLP export
    metrics_port: int | None = None    # None: no Prometheus endpoint; 0: any free port
    metrics_host: str = "0.0.0.0"
    trace_sample: float = 1.0          # ratio of root traces kept; children follow their parent
    export_interval_s: float = 15.0    # OTLP metrics push period

    def __post_init__(self) -> None:
        if not 0.0 <= self.trace_sample <= 1.0:
            raise ValueError("trace_sample must be in [0, 1]")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError("metrics_port must be in [0, 65535]")
        if self.export_interval_s <= 0:
            raise ValueError("export_interval_s must be > 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TelemetryConfig:
        env = os.environ if env is None else env
        port = env.get("OPENLORA_METRICS_PORT", "").strip()
        return cls(otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip(),
                   metrics_port=int(port) if port else None,
                   metrics_host=env.get("OPENLORA_METRICS_HOST", "").strip() or "0.0.0.0",
                   trace_sample=float(env.get("OPENLORA_TRACE_SAMPLE", "").strip() or 1.0))


class Telemetry:
    """What setup_telemetry made for one service: providers, its Metrics, and helpers bound to them."""

    def __init__(self, service_name: str, tracer_provider: TracerProvider, meter_provider: MeterProvider,
                 http_server=None):
        self.service_name = service_name
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.tracer = tracer_provider.get_tracer("openlora")
        self.metrics = Metrics(meter_provider.get_meter("openlora"))
        self._http_server = http_server

    @property
    def metrics_port(self) -> int | None:
        """The port the Prometheus endpoint listens on (None when there is none)."""
        return self._http_server.server_port if self._http_server is not None else None

    def server_interceptor(self) -> grpc.ServerInterceptor:
        return ServerTracingInterceptor(self.tracer)

    def traced_channel(self, channel: grpc.Channel) -> grpc.Channel:
        return traced_channel(channel, self.tracer)

    def span(self, name: str, *, context: otel_context.Context | None = None, **attrs):
        return span(name, tracer=self.tracer, context=context, **attrs)

    def record_span(self, name: str, start_ns: int, end_ns: int, *,
                    context: otel_context.Context | None = None, **attrs) -> None:
        record_span(name, start_ns, end_ns, tracer=self.tracer, context=context, **attrs)

    def shutdown(self) -> None:
        """Flush what is buffered (spans, last metrics) and stop the scrape endpoint."""
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(service_name: str, config: TelemetryConfig | None = None, *,
                    span_exporter: SpanExporter | None = None, metric_readers: Sequence[MetricReader] = (),
                    set_global: bool = True) -> Telemetry:
    """Tracer and meter providers for `service_name`, exporting where `config` says.

    config: None reads the environment (TelemetryConfig.from_env).
    span_exporter: also export spans there, synchronously (tests: InMemorySpanExporter).
    metric_readers: extra readers (tests: InMemoryMetricReader).
    set_global: make them the process's providers (once per process; tests running
    several services in one process pass False and use the returned object's helpers).
    """
    config = config or TelemetryConfig.from_env()
    resource = Resource.create({"service.name": service_name, "service.namespace": "openlora",
                                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
    tracer_provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.trace_sample)))
    if span_exporter is not None:
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    readers = list(metric_readers)
    if config.otlp_endpoint:
        span_out, metric_out = _otlp_exporters(config.otlp_endpoint)
        tracer_provider.add_span_processor(BatchSpanProcessor(span_out))
        readers.append(PeriodicExportingMetricReader(metric_out, int(config.export_interval_s * 1000)))
    http_server = None
    if config.metrics_port is not None:
        reader, http_server = _prometheus(config.metrics_host, config.metrics_port)
        readers.append(reader)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        otel_metrics.set_meter_provider(meter_provider)
    return Telemetry(service_name, tracer_provider, meter_provider, http_server)


@functools.cache
def global_telemetry() -> Telemetry:
    """The process's global providers as a Telemetry: what a service builder uses when given none.

    No-op until setup_telemetry(set_global=True) runs, live after it (the global tracer
    and meter delegate to whatever provider is set). Never shut it down: whoever called
    setup_telemetry shuts that down.
    """
    return Telemetry("", trace.get_tracer_provider(), otel_metrics.get_meter_provider())


def _otlp_exporters(endpoint: str):
    try:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise RuntimeError("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is missing: "
                           "pip install 'openlora[otlp]'") from exc
    insecure = not endpoint.startswith("https://")  # in-cluster collectors speak plaintext
    return (OTLPSpanExporter(endpoint=endpoint, insecure=insecure),
            OTLPMetricExporter(endpoint=endpoint, insecure=insecure))


def _prometheus(host: str, port: int):
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        raise RuntimeError("OPENLORA_METRICS_PORT is set but the Prometheus exporter is missing: "
                           "pip install 'openlora[otlp]'") from exc
    # own registry: several services in one process (tests) must not serve each other's metrics
    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return reader, server


def _attributes(attrs: dict) -> dict:
    return {key: value for key, value in attrs.items() if value is not None}


def span(name: str, *, tracer: trace.Tracer | None = None, context: otel_context.Context | None = None,
         **attrs) -> AbstractContextManager[trace.Span]:
    """`with span("prefill", adapter=a):` a child span of the current one (or of `context`),
    current inside the block. Exceptions are recorded and mark it as an error; None
    attributes are dropped. tracer: None uses the global provider."""
    tracer = tracer or trace.get_tracer("openlora")
    return tracer.start_as_current_span(name, context=context, attributes=_attributes(attrs))


def record_span(name: str, start_ns: int, end_ns: int, *, tracer: trace.Tracer | None = None,
                context: otel_context.Context | None = None, **attrs) -> None:
    """A span measured after the fact (e.g. queue wait, known once a request is scheduled).

    start_ns/end_ns: wall-clock nanoseconds (time.time_ns()); context: the request's
    context captured with current_context() when it arrived.
    """
    tracer = tracer or trace.get_tracer("openlora")
    tracer.start_span(name, context=context, start_time=start_ns, attributes=_attributes(attrs)).end(end_ns)


def current_context() -> otel_context.Context:
    """The caller's trace context, to carry with a request into another thread (the engine loop)."""
    return otel_context.get_current()


def count_request(metrics: Metrics, adapter: str, context: grpc.ServicerContext,
                  responses: Iterable) -> Iterator:
    """Stream a handler's `responses`, then count the request in openlora.requests with the
    status it ended with: OK, its error's code, or CANCELLED / DEADLINE_EXCEEDED when the
    client went away (the stream was closed, or the handler returned early on seeing it)."""
    code = grpc.StatusCode.OK
    try:
        yield from responses
    except Exception as exc:
        code = status_of(exc)[0]
        raise
    finally:
        if code is grpc.StatusCode.OK and not context.is_active():
            code = ended_early_code(context)
        metrics.request_finished(adapter, code.name)
