"""AdapterSource: the tiers below the device (CPU cache <- disk cache <- store).

request() returns a ticket at once; a small thread pool resolves the ref with the
store (GetAdapter), checks the base model, then looks in the CPU cache, the disk
cache (by sha256) and finally downloads from the store. The blob is loaded, its
shapes checked against the model, put in (pinned where CUDA is) host memory and
in the CPU cache. Failures land on the ticket as our errors (NotFound, Unavailable,
FailedPrecondition, InvalidArgument); nothing is raised into the engine.

Tickets for the same adapter share one fetch. A ticket holds a pin on its CPU
cache entry for as long as the ticket object lives: an adapter some request
still needs is never evicted from the CPU tier.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from inference_worker.adapter_cache import AdapterCache
from inference_worker.adapter_checks import ModelShapes, check_base_model, check_shapes
from inference_worker.adapter_weights import AdapterWeights, load_adapter_blob
from inference_worker.disk_cache import DiskCache
from inference_worker.interfaces import MergeRecipe
from services.errors import InvalidArgument, OpenLoRAError, Unavailable, from_rpc_error
from services.telemetry import Telemetry, current_context, global_telemetry

log = logging.getLogger(__name__)

TIERS = ("gpu", "cpu", "disk", "store")   # nearest first


@dataclass
class ManagerConfig:
    base_model: str                       # "" = accept any (the shape check still applies)
    data_dir: str                         # disk cache root
    cpu_cache_bytes: int = 4 << 30
    disk_cache_bytes: int = 50 << 30
    max_lora_rank: int = 64               # larger adapters are FailedPrecondition
    fetch_threads: int = 4
    latest_ttl_s: float = 1.5             # how long "name" -> latest version is trusted
    pin_memory: bool | None = None        # None: when CUDA is available (faster H2D copies)
    merge_device: str = "cpu"             # where merges are computed (the engine's device)
    download_timeout_s: float = 600.0     # one blob from the store

    def __post_init__(self) -> None:
        for name in ("cpu_cache_bytes", "disk_cache_bytes", "latest_ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.download_timeout_s > 0:
            raise ValueError("download_timeout_s must be > 0")
        if self.max_lora_rank < 1 or self.fetch_threads < 1:
            raise ValueError("max_lora_rank and fetch_threads must be >= 1")
        if not self.data_dir:
            raise ValueError("data_dir is required")


class Ticket:
    """AdapterTicket. `key` is the ref until resolved, then "name@version" (or "merge:…")."""

    def __init__(self, key: str):
        self.key = key
        self.tier = ""                    # where it was found: cpu, disk, store
        self.load_ms = 0.0
        self._done = threading.Event()
        self._weights: AdapterWeights | None = None
        self._error: OpenLoRAError | None = None

    def ready(self) -> bool:
        return self._done.is_set() and self._error is None

    def error(self) -> OpenLoRAError | None:
        return self._error if self._done.is_set() else None

    def weights(self) -> AdapterWeights:
        if not self.ready():
            raise RuntimeError(f"adapter {self.key} is not ready")
        return self._weights

    def wait(self, timeout: float | None = None) -> bool:
        """True once settled (ready or failed: see error()), False on timeout."""
        return self._done.wait(timeout)


class AdapterManager:
    def __init__(self, config: ManagerConfig, store, shapes: ModelShapes, telemetry: Telemetry | None = None):
        """`store`: a services.store_client.StoreClient (get(ref), download(ref, path, resume)).
        telemetry: None uses the process's global providers."""
        self.config = config
        self._tel = telemetry or global_telemetry()
        self.cpu = AdapterCache(config.cpu_cache_bytes)
        self.disk = DiskCache(config.data_dir, config.disk_cache_bytes)
        self._store = store
        self._shapes = shapes
        self._pin_memory = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
        self._pool = ThreadPoolExecutor(config.fetch_threads, thread_name_prefix="adapter-fetch")
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, Ticket] = {}
        self._resolved: dict[str, tuple[object, float]] = {}   # ref -> (Adapter proto, expiry)
        self._key_locks: dict[str, threading.Lock] = {}

    # --- AdapterSource -------------------------------------------------------------------
    def request(self, ref: str) -> Ticket:
        adapter = self._cached_resolution(ref)
        if adapter is None:
            return self._start(("ref", ref), ref, lambda: self._load_ref(ref))
        key = _key_of(adapter)
        weights = self._acquire(key)
        if weights is not None:              # the common case: no thread hop
            return self._settled(Ticket(key), weights, "cpu", time.monotonic())
        return self._start(key, key, lambda: self._load_ref(key))

    def request_merge(self, spec: MergeRecipe) -> Ticket:
        key = self._cached_merge_key(spec)
        weights = self._acquire(key) if key else None
        if weights is not None:              # a repeated recipe: no thread hop
            return self._settled(Ticket(key), weights, "cpu", time.monotonic())
        return self._start(("merge", spec), "merge:" + "+".join(spec.adapters), lambda: self._load_merge(spec))

    def cpu_resident(self) -> list[str]:
        return self.cpu.keys()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- fetching ------------------------------------------------------------------------
    def _start(self, fetch_id: Hashable, provisional_key: str,
               load: Callable[[], tuple[AdapterWeights, str]]) -> Ticket:
        with self._lock:
            ticket = self._inflight.get(fetch_id)
            if ticket is not None:
                return ticket
            ticket = self._inflight[fetch_id] = Ticket(provisional_key)
        try:
            # the requester's trace: the fetch (and its store calls) join it from the pool thread
            self._pool.submit(self._run, ticket, fetch_id, load, time.monotonic(), current_context())
        except RuntimeError:                 # closed: the worker is stopping
            self._run(ticket, fetch_id, _raise_unavailable, time.monotonic(), current_context())
        return ticket

    def _run(self, ticket: Ticket, fetch_id: Hashable, load, t0: float, trace_context) -> None:
        try:
            with self._tel.span("adapter.fetch", context=trace_context, adapter=ticket.key) as span:
                weights, tier = load()
                span.set_attribute("tier", tier)
            self._settled(ticket, weights, tier, t0)
        except Exception as exc:
            ticket._error = _as_error(exc)
            if not isinstance(exc, OpenLoRAError):
                log.warning("adapter %s failed: %s", ticket.key, ticket._error, exc_info=exc)
            ticket._done.set()
        finally:
            with self._lock:
                self._inflight.pop(fetch_id, None)

    def _settled(self, ticket: Ticket, weights: AdapterWeights, tier: str, t0: float) -> Ticket:
        """Fill a ticket that owns one CPU-cache pin of weights.key; the pin ends with the ticket."""
        ticket.key, ticket.tier, ticket._weights = weights.key, tier, weights
        ticket.load_ms = (time.monotonic() - t0) * 1000.0
        weakref.finalize(ticket, self.cpu.unpin, weights.key)
        self._record_lookup(weights.key, tier, ticket.load_ms / 1000.0)
        ticket._done.set()
        return ticket

    def _record_lookup(self, key: str, tier: str, seconds: float) -> None:
        """openlora.adapter.loads: a miss in each tier looked in before `tier`, a hit there (with
        the time it took). The GPU tier is counted by the servicer, before this lookup."""
        for missed in TIERS[1:TIERS.index(tier)]:
            self._tel.metrics.adapter_load(missed, "miss", key)
        self._tel.metrics.adapter_load(tier, "hit", key, seconds=seconds)

    def _load_ref(self, ref: str) -> tuple[AdapterWeights, str]:
        """Resolve, check, and return (weights, tier) holding one CPU-cache pin of the key."""
        adapter = self._resolve(ref)
        key = _key_of(adapter)
        check_base_model(self.config.base_model, adapter.base_model, key)
        with self._key_lock(key):
            weights = self._acquire(key)
            if weights is not None:
                return weights, "cpu"
            downloaded = []

            def download(part_path):
                downloaded.append(True)
                self._store.download(key, part_path, resume=True, timeout=self.config.download_timeout_s)
            with self.disk.hold(adapter.sha256, download) as path:
                try:
                    weights = load_adapter_blob(path, key, pin_memory=self._pin_memory)
                except ValueError as exc:
                    raise InvalidArgument(f"adapter {key}: {exc}") from None
            weights.base_model = adapter.base_model or weights.base_model
            return self._admit(weights, pin=False), "store" if downloaded else "disk"

    def _load_merge(self, recipe: MergeRecipe) -> tuple[AdapterWeights, str]:
        from inference_worker.merge import merge_adapters, merge_key

        keys = [_key_of(self._resolve(ref)) for ref in recipe.adapters]
        key = merge_key(keys, recipe)
        parts: list[tuple[AdapterWeights, str]] = []
        with self._key_lock(key):
            cached = self._acquire(key)
            if cached is not None:
                return cached, "cpu"
            try:
                for part_key in keys:
                    parts.append(self._load_ref(part_key))   # one pin each, released below
                merged = merge_adapters([w for w, _ in parts], recipe, key=key, device=self.config.merge_device)
                tier = max((t for _, t in parts), key=TIERS.index)
                return self._admit(merged.to("cpu"), pin=self._pin_memory), tier
            finally:
                for weights, _ in parts:
                    self.cpu.unpin(weights.key)

    def _admit(self, weights: AdapterWeights, pin: bool) -> AdapterWeights:
        """Shape-check, copy to page-locked memory if `pin`, cache with one pin for the caller.
        Blobs are read straight into page-locked memory (no second copy), so they pass False."""
        check_shapes(weights, self._shapes, self.config.max_lora_rank)
        if pin:
            weights = weights.to(pin_memory=True)
        self.cpu.pin(weights.key)
        self.cpu.put(weights.key, weights)
        return weights

    def _acquire(self, key: str) -> AdapterWeights | None:
        """The cached weights with one pin taken, or None (no pin)."""
        self.cpu.pin(key)
        weights = self.cpu.get(key)
        if weights is None:
            self.cpu.unpin(key)
        return weights

    # --- resolution ----------------------------------------------------------------------
    def _cached_resolution(self, ref: str):
        with self._lock:
            hit = self._resolved.get(ref)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def _cached_merge_key(self, recipe: MergeRecipe) -> str | None:
        """The recipe's key when every ref is resolved in memory (None otherwise, or if invalid)."""
        from inference_worker.merge import merge_key

        adapters = [self._cached_resolution(ref) for ref in recipe.adapters]
        if None in adapters:
            return None
        try:
            return merge_key([_key_of(a) for a in adapters], recipe)
        except InvalidArgument:
            return None

    def _resolve(self, ref: str):
        """Adapter proto of `ref`. "name@version" is immutable (kept); "name" only briefly."""
        adapter = self._cached_resolution(ref)
        if adapter is not None:
            return adapter
        try:
            adapter = self._store.get(ref)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        expiry = time.monotonic() + self.config.latest_ttl_s
        with self._lock:
            self._resolved[_key_of(adapter)] = (adapter, float("inf"))
            if ref != _key_of(adapter):
                self._resolved[ref] = (adapter, expiry)
        return adapter

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())


def _key_of(adapter) -> str:
    return f"{adapter.name}@{adapter.version}"


def _as_error(exc: BaseException) -> OpenLoRAError:
    if isinstance(exc, OpenLoRAError):
        return exc
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return from_rpc_error(exc)
    return OpenLoRAError(f"adapter fetch failed: {type(exc).__name__}: {exc}")


def _raise_unavailable():
    raise Unavailable("the worker is stopping")
