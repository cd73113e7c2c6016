"""Contracts inside the worker: engine <-> adapter tiers <-> gRPC servicer.

engine.py (continuous batching, paged KV, LoRA slots) knows adapters only through
`AdapterSource`; the tiers (adapter_manager.py: CPU LRU cache <- disk cache <-
store) implement it. The servicer (service.py) talks to the engine only through
`EngineRequest` in and `RequestOutput` out.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Protocol

from inference_worker.adapter_weights import AdapterWeights
from services.errors import OpenLoRAError


@dataclass
class SamplingConfig:
    """Validated sampling parameters (the servicer converts protos.SamplingParams)."""

    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: int | None = None           # per-request generator: same seed, same output, any batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    logprobs: int = 0                 # top-n logprobs per token, 0..20

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not (self.temperature >= 0):
            raise ValueError("temperature must be >= 0")
        if not (0 < self.top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not (self.repetition_penalty > 0):
            raise ValueError("repetition_penalty must be > 0")
        if not (0 <= self.logprobs <= 20):
            raise ValueError("logprobs must be in 0..20")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


class AdapterTicket(Protocol):
    """A handle on an adapter being made resident in CPU memory (non-blocking)."""

    key: str                              # resolved key: "name@version" or "merge:<hash>"

    def ready(self) -> bool: ...          # weights available (CPU, pinned where possible)

    def error(self) -> OpenLoRAError | None: ...  # NotFound, FailedPrecondition, ... when it failed

    def weights(self) -> AdapterWeights: ...      # only when ready()

    def wait(self, timeout: float | None = None) -> bool: ...  # for LoadAdapter; never in the step loop


class AdapterSource(Protocol):
    """Adapter tiers below the device: CPU cache <- disk cache <- store.

    request() starts the fetch in a background thread and returns at once; the
    engine polls ticket.ready() each step and never blocks on I/O.
    """

    def request(self, ref: str) -> AdapterTicket: ...

    def request_merge(self, spec: "MergeRecipe") -> AdapterTicket: ...

    def cpu_resident(self) -> list[str]: ...   # keys in the CPU cache (for WorkerStatus)


@dataclass(frozen=True)
class MergeRecipe:
    """Several adapters combined into one (PEFT add_weighted_adapter semantics)."""

    adapters: tuple[str, ...]             # refs as the user gave them
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0
    svd_rank: int = 0


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingConfig
    adapter: str = ""                     # ref; "" = base model
    merge: MergeRecipe | None = None
    # Called from the engine thread with each new output; must not block.
    on_output: Callable[["RequestOutput"], None] | None = None
    arrival_time: float = 0.0             # time.monotonic() at arrival (set by engine if 0)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token_id, logprob), best first


@dataclass
class RequestOutput:
    """What one step produced for one request (streamed; `finished` on the last)."""

    request_id: str
    token_ids: list[int]                  # new tokens this step (may be empty on finish/error)
    text: str                             # new text: whole UTF-8 characters only, stop strings cut
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""               # "length" | "stop" | "eos" | "cancelled" | "error"
    error: OpenLoRAError | None = None    # set when finish_reason == "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0                 # arrival -> first scheduled
    adapter_load_ms: float = 0.0          # arrival -> adapter resident on device
    first_token_ms: float = 0.0           # arrival -> first token
    total_ms: float = 0.0


@dataclass
class EngineStats:
    """A snapshot for WorkerStatus (taken under the engine's lock, cheap)."""

    gpu_adapters: list[str]               # keys resident in device slots
    free_adapter_slots: int
    total_adapter_slots: int
    running_requests: int
    waiting_requests: int                 # incl. those waiting for their adapter
    kv_blocks_used: int
    kv_blocks_total: int


class Engine(Protocol):
    """What the servicer needs from the engine (engine.py: LLMEngine implements it).

    The engine owns one background thread that runs steps while there is work.
    All methods are thread-safe and never block on a step.
    """

    tokenizer: object                     # transformers tokenizer of the model dir
    max_model_len: int

    def start(self) -> None: ...

    def stop(self) -> None: ...           # abort everything (finish_reason "cancelled"), join the thread

    def add_request(self, request: EngineRequest) -> None: ...
    # raises InvalidArgument (prompt empty/too long, token id out of range),
    # ResourceExhausted (waiting queue full), Unavailable (stopping)

    def abort_request(self, request_id: str) -> None: ...   # frees blocks and unpins the slot at once

    def pin_adapter(self, ticket: AdapterTicket, pin: bool = True) -> "Future[None]": ...
    # LoadAdapter: the engine thread loads it into a slot (pinned if pin); the future resolves then,
    # or raises the ticket's error / FailedPrecondition (shapes) / ResourceExhausted (all slots pinned)
    def unpin_adapter(self, key: str) -> bool: ...               # UnloadAdapter: unpin + free the slot if idle

    def stats(self) -> EngineStats: ...
