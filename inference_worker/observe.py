"""The worker's telemetry around the engine: request spans and metrics, engine gauges.

The engine reports, on a request's last output, arrival-based timings (queue_ms,
adapter_load_ms, first_token_ms, total_ms). The servicer captured the request's trace
context and wall-clock arrival when it arrived; from those the request's phases are
recorded afterwards as child spans of its SERVER span, so the engine thread never
touches telemetry:

    queue_wait     arrival -> first scheduled (includes waiting for the adapter)
    adapter.load   arrival -> adapter resident in a device slot (when it had one to wait for)
    prefill        first scheduled -> first token
    decode         first token -> finish
"""
from __future__ import annotations

import threading

from opentelemetry import context as otel_context

from inference_worker.interfaces import Engine, RequestOutput
from services.metrics import Metrics
from services.telemetry import Telemetry

MONITOR_INTERVAL_S = 1.0


def record_finished(tel: Telemetry, out: RequestOutput, *, adapter: str, request_id: str,
                    context: otel_context.Context, arrival_ns: int) -> None:
    """Spans and metrics of a request from its last output (finished or failed)."""
    def at(ms: float) -> int:
        return arrival_ns + int(ms * 1e6)

    attrs = {"request_id": request_id, "adapter": adapter or None, "prompt_tokens": out.prompt_tokens,
             "completion_tokens": out.completion_tokens, "finish_reason": out.finish_reason}
    if out.queue_ms > 0:
        tel.record_span("queue_wait", arrival_ns, at(out.queue_ms), context=context, **attrs)
    if out.adapter_load_ms > 0:
        tel.record_span("adapter.load", arrival_ns, at(out.adapter_load_ms), context=context, **attrs)
    if out.first_token_ms > 0:
        tel.record_span("prefill", at(out.queue_ms), at(out.first_token_ms), context=context, **attrs)
        tel.record_span("decode", at(out.first_token_ms), at(out.total_ms), context=context, **attrs)

    m = tel.metrics
    if out.finish_reason != "error":           # a failed request (e.g. unknown adapter) used no tokens
        m.tokens(adapter, prompt=out.prompt_tokens, output=out.completion_tokens)
    if out.first_token_ms > 0:
        m.time_to_first_token(adapter, out.first_token_ms / 1000.0)
    if out.completion_tokens > 1:
        m.time_per_output_token(adapter, (out.total_ms - out.first_token_ms) / 1000.0 / (out.completion_tokens - 1))


def record_gpu_lookup(metrics: Metrics, engine: Engine, ref: str) -> None:
    """GPU tier hit or miss: was the requested adapter in a device slot when the request arrived?

    A bare "name" matches any resident version of it (the ref resolves in the background)."""
    resident = engine.stats().gpu_adapters
    hit = ref in resident or any(key.partition("@")[0] == ref for key in resident)
    metrics.adapter_load("gpu", "hit" if hit else "miss", ref)


class EngineMonitor:
    """Samples the engine every `interval_s`: queue depth, running batch and KV-cache gauges,
    and device-slot evictions.

    Evictions are counted exactly from the slot pool's counter (LLMEngine's; with another
    engine, from the resident set alone); they are labelled with the adapters that left
    the slots since the last sample, "unknown" for any that left and came back in between.
    """

    def __init__(self, engine: Engine, metrics: Metrics, interval_s: float = MONITOR_INTERVAL_S):
        self._engine = engine
        self._metrics = metrics
        self._interval_s = interval_s
        self._slot_pool = getattr(engine, "slot_pool", None)
        self._num_evictions = self._slot_pool.num_evictions if self._slot_pool is not None else 0
        self._resident: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sample(self) -> None:
        # the counter before the stats: an eviction in between is counted at the next sample
        num_evictions = self._slot_pool.num_evictions if self._slot_pool is not None else 0
        stats = self._engine.stats()
        kv_usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        self._metrics.engine_state(stats.waiting_requests, stats.running_requests, kv_usage)
        resident = set(stats.gpu_adapters)
        gone = sorted(self._resident - resident)
        count = num_evictions - self._num_evictions if self._slot_pool is not None else len(gone)
        for key in (gone + ["unknown"] * count)[:count]:
            self._metrics.adapter_load("gpu", "evict", key)
        self._resident, self._num_evictions = resident, num_evictions

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()
