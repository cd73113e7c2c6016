"""One request as the scheduler and model runner see it: tokens, KV blocks, adapter slot, state."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from inference_worker.interfaces import AdapterTicket, EngineRequest
from services.errors import OpenLoRAError

_arrival_counter = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"                   # queued, or preempted (its KV is gone; recomputed later)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: EngineRequest
    ticket: AdapterTicket | None          # None = base model
    generator: torch.Generator | None     # per-request sampling stream (seeded requests)
    arrival_index: int = field(default_factory=lambda: next(_arrival_counter))   # FCFS order; larger = younger
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)   # KV block ids, position p in block p // block_size
    num_cached: int = 0                   # tokens whose K/V are in the cache (or written by a step in flight)
    num_pending: int = 0                  # tokens sampled by steps in flight, not yet read back
    pending_row: int = -1                 # this sequence's row in the newest step in flight
    slot: int = -1                        # device LoRA slot while running; -1 = base model
    adapter_key: str = ""                 # resolved ticket key once its slot is held
    num_preemptions: int = 0
    error: OpenLoRAError | None = None    # why it failed (adapter ticket or slot load)
    # timings, time.monotonic()
    first_scheduled_at: float | None = None
    adapter_ready_at: float | None = None
    first_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt + outputs, pending ones included (what the next step's positions and blocks need)."""
        return len(self.request.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    def length_reached(self, max_seq_tokens: int) -> bool:
        """Its tokens, pending ones included, already end it by max_tokens or the model's length."""
        return (len(self.output_token_ids) + self.num_pending >= self.request.sampling.max_tokens
                or self.num_tokens >= max_seq_tokens)

    @property
    def all_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_token_ids

    @property
    def num_new_tokens(self) -> int:
        """Tokens the next step feeds the model: all of them for a prefill (nothing cached: a new
        prompt, or prompt + outputs after a preemption), else the last one."""
        return self.num_tokens - self.num_cached

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def ms_since_arrival(self, t: float | None) -> float:
        return 0.0 if t is None else (t - self.request.arrival_time) * 1000.0

    def now_ms(self) -> float:
        return self.ms_since_arrival(time.monotonic())
