"""The metrics of every OpenLoRA service: one method per event, label names fixed here.

Each service records the subset that concerns it (the router: requests and TTFT seen
from the front; a worker: tokens, adapter tiers, queue, batch, KV cache; the store:
bytes and errors). Instruments with no recording are not exported.

OTel name -> Prometheus name (dots become underscores, the unit becomes a suffix):
    openlora.requests                  openlora_requests_total{adapter,code}
    openlora.router.retries            openlora_router_retries_total{adapter,code}
    openlora.prompt_tokens             openlora_prompt_tokens_total{adapter}
    openlora.output_tokens             openlora_output_tokens_total{adapter}
    openlora.time_to_first_token       openlora_time_to_first_token_seconds_bucket{adapter,le}
    openlora.time_per_output_token     openlora_time_per_output_token_seconds_bucket{adapter,le}
    openlora.adapter.loads             openlora_adapter_loads_total{tier,result,adapter}
    openlora.adapter.load_duration     openlora_adapter_load_duration_seconds_bucket{tier,le}
    openlora.queue.depth               openlora_queue_depth
    openlora.batch.running             openlora_batch_running
    openlora.kv_cache.usage            openlora_kv_cache_usage
    openlora.store.bytes               openlora_store_bytes_total{direction,adapter}
    openlora.store.errors              openlora_store_errors_total{op,code}
"""
from __future__ import annotations

from opentelemetry import metrics as otel_metrics

BASE_ADAPTER = "base"  # the `adapter` label of a request on the bare base model
TIERS = ("gpu", "cpu", "disk", "store")
LOAD_RESULTS = ("hit", "miss", "evict")
DIRECTIONS = ("upload", "download")

# Buckets in seconds: TTFT spans queueing + adapter load + prefill; TPOT one decode step.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
LOAD_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


MERGED_ADAPTER = "merge"  # the `adapter` label of a merged recipe (one series for all recipes)


def _adapter(ref: str) -> str:
    """The `adapter` label of a ref or key: its name ("name@3" -> "name": one series per
    adapter, not per version), "merge" for a merge ("merge:..."), "base" for none."""
    if ref.startswith("merge:"):
        return MERGED_ADAPTER
    return ref.partition("@")[0] or BASE_ADAPTER


def adapter_ref(request) -> str:
    """What a GenerateRequest runs on, for labels and span attributes: its adapter ref,
    "merge:a+b" for a merge (labelled "merge"), "" for the base model."""
    if request.merge.adapters:
        return "merge:" + "+".join(a.adapter for a in request.merge.adapters)
    return request.adapter


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    # label values are a closed set: a typo must not mint a new time series
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


class Metrics:
    """meter: None uses the global meter provider (a no-op until setup_telemetry)."""

    def __init__(self, meter: otel_metrics.Meter | None = None):
        meter = meter or otel_metrics.get_meter("openlora")
        self._requests = meter.create_counter(
            "openlora.requests", "{request}", "Requests finished, by adapter and gRPC status code")
        self._retries = meter.create_counter(
            "openlora.router.retries", "{attempt}",
            "Router attempts a worker failed before the first token with a retryable status "
            "(another worker is tried while attempts remain)")
        self._prompt_tokens = meter.create_counter("openlora.prompt_tokens", "{token}", "Prompt tokens")
        self._output_tokens = meter.create_counter("openlora.output_tokens", "{token}", "Generated tokens")
        self._ttft = meter.create_histogram(
            "openlora.time_to_first_token", "s", "Arrival to first token",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS_S)
        self._tpot = meter.create_histogram(
            "openlora.time_per_output_token", "s", "Mean time between output tokens after the first",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS_S)
        self._adapter_loads = meter.create_counter(
            "openlora.adapter.loads", "{load}", "Adapter look-ups per cache tier: hit, miss or evict")
        self._adapter_load_duration = meter.create_histogram(
            "openlora.adapter.load_duration", "s", "Time to make an adapter resident, by the tier it came from",
            explicit_bucket_boundaries_advisory=LOAD_BUCKETS_S)
        self._queue_depth = meter.create_gauge("openlora.queue.depth", "{request}", "Requests waiting")
        self._running = meter.create_gauge("openlora.batch.running", "{request}", "Requests in the running batch")
        self._kv_usage = meter.create_gauge("openlora.kv_cache.usage", "1", "Fraction of KV-cache blocks in use")
        self._store_bytes = meter.create_counter("openlora.store.bytes", "By", "Adapter bytes uploaded/downloaded")
        self._store_errors = meter.create_counter("openlora.store.errors", "{error}", "Store RPCs that failed")

    # -- requests (router and worker) --
    def request_finished(self, adapter: str, code: str = "OK") -> None:
        """code: the gRPC status code name (`grpc.StatusCode.X.name`)."""
        self._requests.add(1, {"adapter": _adapter(adapter), "code": code})

    def request_retried(self, adapter: str, code: str) -> None:
        """Router: a worker failed an attempt before its first token with retryable `code`."""
        self._retries.add(1, {"adapter": _adapter(adapter), "code": code})

    def tokens(self, adapter: str, prompt: int = 0, output: int = 0) -> None:
        labels = {"adapter": _adapter(adapter)}
        if prompt:
            self._prompt_tokens.add(prompt, labels)
        if output:
            self._output_tokens.add(output, labels)

    def time_to_first_token(self, adapter: str, seconds: float) -> None:
        self._ttft.record(seconds, {"adapter": _adapter(adapter)})

    def time_per_output_token(self, adapter: str, seconds: float) -> None:
        self._tpot.record(seconds, {"adapter": _adapter(adapter)})

    # -- adapter tiers (worker) --
    def adapter_load(self, tier: str, result: str, adapter: str = "", seconds: float | None = None) -> None:
        """A look-up in `tier` (gpu, cpu, disk, store) that hit, missed or evicted;
        `seconds`: how long making it resident took when it was loaded from `tier`."""
        _check(tier, TIERS, "tier")
        _check(result, LOAD_RESULTS, "result")
        self._adapter_loads.add(1, {"tier": tier, "result": result, "adapter": _adapter(adapter)})
        if seconds is not None:
            self._adapter_load_duration.record(seconds, {"tier": tier})

    # -- engine state (worker), set on every step or status tick --
    def engine_state(self, queue_depth: int, running: int, kv_cache_usage: float) -> None:
        self._queue_depth.set(queue_depth)
        self._running.set(running)
        self._kv_usage.set(kv_cache_usage)

    # -- store --
    def store_bytes(self, direction: str, num_bytes: int, adapter: str | None = None) -> None:
        _check(direction, DIRECTIONS, "direction")
        labels = {"direction": direction}
        if adapter is not None:
            labels["adapter"] = _adapter(adapter)
        self._store_bytes.add(num_bytes, labels)

    def store_error(self, op: str, code: str) -> None:
        """op: the RPC (e.g. "UploadAdapter"); code: the gRPC status code name."""
        self._store_errors.add(1, {"op": op, "code": code})
