"""Continuous batching: which sequences run in the next step.

Every step:
1. Decodes first, oldest first: each running sequence needs room for one more token;
   when blocks run out the youngest running sequence is preempted (its blocks freed,
   its slot unpinned, back at the head of the waiting queue to be recomputed later).
2. Then, unless step 1 had to preempt, admit waiting sequences in FCFS order within
   max_num_seqs, max_num_batched_tokens, free blocks and adapter slots. A sequence
   whose adapter is still being fetched is skipped (it keeps its place, others pass
   it); the first one that does not fit for lack of a resource stops admission, so
   nobody overtakes it and it cannot starve.
3. With hold_prefill_steps > 0, ready prompts wait up to that many steps while a waiting
   sequence's adapter is still being fetched or copied and the step has room for it:
   the prompts of one burst then share one eager (prompt-heavy) step instead of two,
   which costs far more than the decode step they wait (issue 9's S1000, a prompt-heavy
   step ~68 ms against a 10 ms decode step: bench/results/engine-h200-runs.md).
"""
from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from inference_worker.block_manager import BlockManager
from inference_worker.sequence import SeqStatus, Sequence


class AdapterState(enum.Enum):
    PENDING = "pending"                   # ticket not ready: wait without blocking others
    READY = "ready"                       # base model, or weights in CPU memory
    FAILED = "failed"                     # seq.error is set


class AdapterGate(Protocol):
    """The engine's view of adapters for the scheduler (tickets and device slots)."""

    def begin_pass(self) -> None: ...                  # a scheduling pass starts (once per step)

    def state(self, seq: Sequence) -> AdapterState: ...

    def acquire(self, seq: Sequence) -> bool: ...     # pin a slot (loading it); False = all slots pinned.
    # May set seq.error (shape mismatch): the scheduler then treats it as FAILED.

    def release(self, seq: Sequence) -> None: ...     # unpin the slot a sequence holds (idempotent)


@dataclass
class SchedulerOutput:
    prefills: list[Sequence] = field(default_factory=list)    # compute all their tokens
    decodes: list[Sequence] = field(default_factory=list)     # compute their last token
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)      # adapter errors, out of the queue

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.prefills) + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, block_manager: BlockManager, gate: AdapterGate, max_num_seqs: int,
                 max_num_batched_tokens: int, max_seq_tokens: int | None = None,
                 hold_prefill_steps: int = 0) -> None:
        self.block_manager = block_manager
        self.gate = gate
        self.max_seq_tokens = max_seq_tokens or 1 << 62     # a sequence never grows past it
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.hold_prefill_steps = hold_prefill_steps
        self._held = 0                          # consecutive steps ready prompts were held
        self.num_held_steps = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted or failed): blocks and slot back at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self.gate.release(seq)
        seq.status = SeqStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.gate.begin_pass()
        out.decodes = self._schedule_decodes(out.preempted)
        budget = self.max_num_batched_tokens - len(out.decodes)
        if not out.preempted and not self._hold(budget):
            self._admit(out, token_budget=budget)
        return out

    def _hold(self, token_budget: int) -> bool:
        """Whether ready prompts wait this step for a pending adapter of the queue (rule 3).
        Only while decodes keep the GPU busy, and at most hold_prefill_steps steps in a row."""
        if not self.hold_prefill_steps or not self.running or self._held >= self.hold_prefill_steps:
            self._held = 0
            return False
        ready_tokens, pending = 0, False
        for seq in itertools.islice(self.waiting, max(0, self.max_num_seqs - len(self.running))):
            state = self.gate.state(seq)                # (starts the adapter's copy, as admission would)
            if state is AdapterState.PENDING:
                pending = True
            elif state is AdapterState.READY:
                ready_tokens += seq.num_tokens
        if not (pending and 0 < ready_tokens < token_budget):
            self._held = 0
            return False
        self._held += 1
        self.num_held_steps += 1
        return True

    def _schedule_decodes(self, preempted: list[Sequence]) -> list[Sequence]:
        # tokens still in flight already end some (async scheduling): they wait for their last
        # token to be read back, without a step or a block more
        queue, ending = [], []
        for seq in sorted(self.running, key=lambda s: s.arrival_index):
            ends = seq.num_pending and seq.length_reached(self.max_seq_tokens)
            (ending if ends else queue).append(seq)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            while not self.block_manager.can_append(seq):
                victim = queue.pop() if queue else seq          # the youngest still in line
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slot(seq)
                kept.append(seq)
        self.running = kept + ending           # admissions append to running, not to the decodes
        return kept

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self.gate.release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, out: SchedulerOutput, token_budget: int) -> None:
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs:
                break
            state = self.gate.state(seq)
            if state is AdapterState.PENDING:
                continue
            if state is AdapterState.READY:
                if seq.num_tokens > token_budget or not self.block_manager.can_allocate(seq):
                    break
                if not self.gate.acquire(seq) and seq.error is None:
                    break                                       # every slot pinned: wait for one
            if seq.error is not None:
                self.waiting.remove(seq)
                seq.status = SeqStatus.FINISHED
                out.failed.append(seq)
                continue
            self.waiting.remove(seq)
            self.block_manager.allocate(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.prefills.append(seq)
            token_budget -= seq.num_tokens
