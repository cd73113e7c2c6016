"""A few requests through router -> worker -> store move each service's metrics as expected,
in-process and on the worker's Prometheus endpoint."""
from __future__ import annotations

import urllib.request

import grpc
import pytest

from tests.deploy.test_metrics import _sample
from tests.deploy.util import wait_until


def _points(reader) -> dict[tuple, object]:
    """(metric name, sorted labels) -> data point, of every metric the reader sees now."""
    data = reader.get_metrics_data()
    if data is None:
        return {}
    return {(metric.name, tuple(sorted(p.attributes.items()))): p
            for rm in data.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics
            for p in metric.data.data_points}


def _value(points, name: str, **labels) -> float:
    """A counter's value (a histogram's count); 0 when the series does not exist yet."""
    point = points.get((name, tuple(sorted(labels.items()))))
    if point is None:
        return 0
    return point.count if hasattr(point, "bucket_counts") else point.value


class Deltas:
    """What changed in one service's metrics since it was made."""

    def __init__(self, reader):
        self._reader = reader
        self._before = _points(reader)

    def __call__(self, name: str, **labels) -> float:
        return _value(_points(self._reader), name, **labels) - _value(self._before, name, **labels)


def test_requests_tokens_tiers_and_store_bytes(observed):
    size = {name: observed.upload(name, seed).size_bytes for name, seed in (("metered", 21), ("other", 22))}
    worker, router, store = (Deltas(observed.readers[s]) for s in ("worker", "router", "store"))
    slot_pool = observed.worker.engine.slot_pool
    evictions_before = slot_pool.num_evictions

    replies = [observed.generate("metered"), observed.generate("metered"), observed.generate("")]
    replies.append(observed.generate("other"))   # one device slot: evicts "metered"
    assert [sum(len(r.token_ids) for r in reply) for reply in replies] == [4, 4, 4, 4]
    prompt_tokens = replies[0][-1].usage.prompt_tokens
    with pytest.raises(grpc.RpcError) as err:
        observed.generate("no-such-adapter")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # requests are counted as their streams end, a moment after the client has the last message
    assert wait_until(lambda: worker("openlora.requests", adapter="no-such-adapter", code="NOT_FOUND") == 1)
    assert wait_until(lambda: router("openlora.requests", adapter="no-such-adapter", code="NOT_FOUND") == 1)
    for deltas in (worker, router):
        assert deltas("openlora.requests", adapter="metered", code="OK") == 2
        assert deltas("openlora.requests", adapter="base", code="OK") == 1
        assert deltas("openlora.time_to_first_token", adapter="metered") == 2
    assert router("openlora.router.retries", adapter="metered", code="UNAVAILABLE") == 0

    assert worker("openlora.prompt_tokens", adapter="metered") == 2 * prompt_tokens
    assert worker("openlora.output_tokens", adapter="metered") == 8
    assert worker("openlora.prompt_tokens", adapter="no-such-adapter") == 0
    assert worker("openlora.time_per_output_token", adapter="metered") == 2
    # tiers: the first "metered" missed the GPU, CPU and disk and came from the store; the
    # second found it on the GPU (and, as every request does, in the CPU cache)
    assert worker("openlora.adapter.loads", tier="gpu", result="miss", adapter="metered") == 1
    assert worker("openlora.adapter.loads", tier="gpu", result="hit", adapter="metered") == 1
    assert worker("openlora.adapter.loads", tier="cpu", result="miss", adapter="metered") == 1
    assert worker("openlora.adapter.loads", tier="disk", result="miss", adapter="metered") == 1
    assert worker("openlora.adapter.loads", tier="store", result="hit", adapter="metered") == 1
    assert worker("openlora.adapter.loads", tier="cpu", result="hit", adapter="metered") == 1
    assert worker("openlora.adapter.load_duration", tier="store") == 2   # "metered" and "other"
    # evictions are sampled by the worker's monitor: each one counted once, whatever its label
    evicted = slot_pool.num_evictions - evictions_before
    assert evicted >= 1

    def evictions_counted():
        return sum(worker("openlora.adapter.loads", tier="gpu", result="evict", adapter=a)
                   for a in ("traced", "metered", "other", "unknown"))
    assert wait_until(lambda: evictions_counted() == evicted)

    assert store("openlora.store.bytes", direction="download", adapter="metered") == size["metered"]
    assert store("openlora.store.bytes", direction="upload", adapter="metered") == 0   # uploaded before
    assert store("openlora.store.errors", op="GetAdapter", code="NOT_FOUND") == 1


def test_engine_gauges_and_prometheus_endpoint(observed):
    observed.upload("scraped", seed=23)
    observed.generate("scraped")
    points = {}

    def gauges_sampled():
        points.update(_points(observed.readers["worker"]))
        return all((name, ()) in points for name in ("openlora.queue.depth", "openlora.batch.running",
                                                     "openlora.kv_cache.usage"))
    assert wait_until(gauges_sampled)            # the monitor samples the engine every second
    assert 0 <= _value(points, "openlora.kv_cache.usage") <= 1

    assert wait_until(lambda: _value(_points(observed.readers["worker"]), "openlora.requests",
                                     adapter="scraped", code="OK") == 1)
    port = observed.telemetry["worker"].metrics_port
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    in_process = _points(observed.readers["worker"])
    assert _sample(text, "openlora_requests_total", adapter="scraped", code="OK") == \
        _value(in_process, "openlora.requests", adapter="scraped", code="OK") == 1
    assert _sample(text, "openlora_output_tokens_total", adapter="scraped") == 4
    assert _sample(text, "openlora_time_to_first_token_seconds_count", adapter="scraped") == 1
    assert _sample(text, "openlora_adapter_loads_total", tier="store", result="hit", adapter="scraped") == 1
    assert "openlora_queue_depth" in text and "openlora_kv_cache_usage" in text
    assert _sample(text, "target_info", service_name="openlora-worker") == 1
