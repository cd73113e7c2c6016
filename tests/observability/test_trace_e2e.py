"""One request, one trace: router -> worker -> store spans with the right parents, and logs
that carry the trace id."""
from __future__ import annotations

import json
import logging

from opentelemetry.trace import SpanKind

from services.logging_setup import setup_logging
from tests.deploy.util import wait_until

ROUTER_GENERATE = "openlora.v1.Router/Generate"
WORKER_GENERATE = "openlora.v1.InferenceWorker/Generate"
GET_ADAPTER = "openlora.v1.AdapterStore/GetAdapter"
DOWNLOAD_ADAPTER = "openlora.v1.AdapterStore/DownloadAdapter"
UPLOAD_ADAPTER = "openlora.v1.AdapterStore/UploadAdapter"
WORKER_PHASES = ("queue_wait", "adapter.load", "prefill", "decode", "adapter.fetch")


def _one(spans, name, kind=SpanKind.INTERNAL):
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, f"{name} {kind}: {sorted((s.name, s.kind.name) for s in spans)}"
    return found[0]


def _service(span) -> str:
    return span.resource.attributes["service.name"]


def test_one_trace_across_router_worker_store(observed):
    observed.upload("traced", seed=11)
    observed.exporter.clear()
    replies = observed.generate(adapter="traced", max_tokens=4)
    num_tokens = sum(len(r.token_ids) for r in replies)
    assert num_tokens == 4

    expected = {(ROUTER_GENERATE, SpanKind.SERVER), (WORKER_GENERATE, SpanKind.CLIENT),
                (WORKER_GENERATE, SpanKind.SERVER), (GET_ADAPTER, SpanKind.CLIENT), (GET_ADAPTER, SpanKind.SERVER),
                (DOWNLOAD_ADAPTER, SpanKind.CLIENT), (DOWNLOAD_ADAPTER, SpanKind.SERVER),
                *((name, SpanKind.INTERNAL) for name in WORKER_PHASES)}
    # RPC spans end as their streams end, a moment after the client has read the last message
    assert wait_until(lambda: {(s.name, s.kind) for s in observed.exporter.get_finished_spans()} >= expected)
    spans = observed.exporter.get_finished_spans()
    assert len(spans) == len(expected)
    root = _one(spans, ROUTER_GENERATE, SpanKind.SERVER)
    assert root.parent is None
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}

    def child_of(parent, name, kind=SpanKind.INTERNAL, service="openlora-worker"):
        span = _one(spans, name, kind)
        assert span.parent is not None and span.parent.span_id == parent.context.span_id, name
        assert _service(span) == service, name
        return span

    router_call = child_of(root, WORKER_GENERATE, SpanKind.CLIENT, "openlora-router")
    assert _service(root) == "openlora-router"
    worker = child_of(router_call, WORKER_GENERATE, SpanKind.SERVER)
    assert worker.parent.is_remote
    phases = {name: child_of(worker, name) for name in WORKER_PHASES}
    fetch = phases["adapter.fetch"]
    for method in (GET_ADAPTER, DOWNLOAD_ADAPTER):
        call = child_of(fetch, method, SpanKind.CLIENT)
        child_of(call, method, SpanKind.SERVER, "openlora-store")

    assert fetch.attributes["adapter"] == "traced" and fetch.attributes["tier"] == "store"
    decode = phases["decode"]
    assert decode.attributes["adapter"] == "traced"
    assert decode.attributes["request_id"]
    assert decode.attributes["completion_tokens"] == 4 and decode.attributes["prompt_tokens"] > 0
    assert decode.attributes["finish_reason"] == "length"
    # the phases follow each other as the engine reported them
    assert phases["queue_wait"].end_time == phases["prefill"].start_time
    assert phases["prefill"].end_time == decode.start_time
    assert worker.attributes["rpc.grpc.status_code"] == 0


def test_logs_inside_a_traced_rpc_carry_its_trace_id(observed, capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("openlora-store")         # JSON lines on (the captured) stderr
    try:
        observed.upload("logged", seed=12)  # the store logs "added logged@1 ..." inside UploadAdapter
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    added = [e for e in lines if e["msg"].startswith("added logged@")]
    assert len(added) == 1, lines
    entry = added[0]
    assert entry["service"] == "openlora-store"

    def upload_span():
        return [s for s in observed.exporter.get_finished_spans()
                if s.name == UPLOAD_ADAPTER and format(s.context.trace_id, "032x") == entry["trace_id"]]
    assert wait_until(upload_span)
    assert entry["span_id"] == format(upload_span()[0].context.span_id, "016x")
