"""Scheduler: FCFS admission within budgets, adapters that lag, preemption of the youngest."""
from __future__ import annotations

from inference_worker.block_manager import BlockManager
from inference_worker.interfaces import EngineRequest, SamplingConfig
from inference_worker.scheduler import AdapterState, Scheduler
from inference_worker.sequence import SeqStatus, Sequence
from services.errors import FailedPrecondition


class FakeGate:
    """Adapters by name: pending until made ready; `slots` distinct adapters may run at once."""

    def __init__(self, slots: int = 8) -> None:
        self.slots = slots
        self.pending: set[str] = set()
        self.broken: set[str] = set()
        self.pins: dict[str, int] = {}

    def begin_pass(self):
        pass

    def state(self, seq):
        name = seq.request.adapter
        if name in self.broken:
            seq.error = FailedPrecondition("broken")
            return AdapterState.FAILED
        return AdapterState.PENDING if name in self.pending else AdapterState.READY

    def acquire(self, seq):
        name = seq.request.adapter
        if not name:
            return True
        if name not in self.pins and len(self.pins) >= self.slots:
            return False
        self.pins[name] = self.pins.get(name, 0) + 1
        seq.slot = list(self.pins).index(name)
        return True

    def release(self, seq):
        if seq.slot >= 0:
            name = seq.request.adapter
            self.pins[name] -= 1
            if not self.pins[name]:
                del self.pins[name]
            seq.slot = -1


def seq(rid: str, num_prompt: int = 4, adapter: str = "") -> Sequence:
    return Sequence(EngineRequest(rid, [1] * num_prompt, SamplingConfig(), adapter=adapter), ticket=None,
                    generator=None)


def make(num_blocks=64, block_size=4, max_seqs=8, max_tokens=64, gate=None):
    gate = gate or FakeGate()
    return Scheduler(BlockManager(num_blocks, block_size), gate, max_seqs, max_tokens), gate


def advance(sched, out):
    """What the engine does after a step: every scheduled sequence gets one token."""
    for s in out.prefills + out.decodes:
        s.num_cached = s.num_tokens
        s.output_token_ids.append(7)


def ids(seqs):
    return [s.request_id for s in seqs]


def test_fcfs_and_seq_budget():
    sched, _ = make(max_seqs=2)
    for i in range(4):
        sched.add(seq(f"r{i}"))
    out = sched.schedule()
    assert ids(out.prefills) == ["r0", "r1"] and not out.decodes
    advance(sched, out)
    out = sched.schedule()
    assert ids(out.decodes) == ["r0", "r1"] and not out.prefills
    sched.finish(sched.running[0])
    advance(sched, out)
    out = sched.schedule()
    assert ids(out.decodes) == ["r1"] and ids(out.prefills) == ["r2"]


def test_token_budget_stops_admission_in_order():
    sched, _ = make(max_tokens=10)
    sched.add(seq("a", 6))
    sched.add(seq("b", 6))          # does not fit with a: waits, and c may not overtake it
    sched.add(seq("c", 2))
    out = sched.schedule()
    assert ids(out.prefills) == ["a"]
    assert out.num_tokens == 6
    advance(sched, out)
    out = sched.schedule()          # 1 decode token + 6 + 2 fit in 10
    assert ids(out.decodes) == ["a"] and ids(out.prefills) == ["b", "c"]


def test_pending_adapter_does_not_block_and_keeps_its_place():
    sched, gate = make(max_seqs=8)
    gate.pending.add("slow")
    sched.add(seq("s", adapter="slow"))
    sched.add(seq("b1"))
    out = sched.schedule()
    assert ids(out.prefills) == ["b1"] and ids(sched.waiting) == ["s"]
    gate.pending.clear()
    sched.add(seq("b2"))
    advance(sched, out)
    out = sched.schedule()
    assert ids(out.prefills) == ["s", "b2"]          # FCFS among the ready ones


def test_failed_adapter_leaves_the_queue():
    sched, gate = make()
    gate.broken.add("bad")
    sched.add(seq("x", adapter="bad"))
    sched.add(seq("y"))
    out = sched.schedule()
    assert ids(out.failed) == ["x"] and isinstance(out.failed[0].error, FailedPrecondition)
    assert ids(out.prefills) == ["y"] and not sched.waiting


def test_no_free_slot_blocks_later_requests_no_starvation():
    sched, _gate = make(gate=FakeGate(slots=1))
    sched.add(seq("a1", adapter="A"))
    out = sched.schedule()
    advance(sched, out)
    sched.add(seq("b1", adapter="B"))     # needs a slot: waits for A to finish
    sched.add(seq("a2", adapter="A"))     # could run (A resident) but must not overtake b1
    sched.add(seq("base"))
    out = sched.schedule()
    assert ids(out.decodes) == ["a1"] and not out.prefills
    sched.finish(sched.running[0])
    advance(sched, out)
    out = sched.schedule()
    assert ids(out.prefills) == ["b1"]    # then a2 waits for B's slot in turn
    assert ids(sched.waiting) == ["a2", "base"]


def test_preempts_youngest_and_requeues_at_head():
    # 3 blocks of 4 tokens: three 4-token prompts fill them; each decode then needs a 2nd block
    sched, _ = make(num_blocks=3, block_size=4)
    for name in ("old", "mid", "young"):
        sched.add(seq(name, 4))
    out = sched.schedule()
    assert ids(out.prefills) == ["old", "mid", "young"]
    advance(sched, out)
    sched.add(seq("late", 1))
    out = sched.schedule()                # old takes young's block; mid has nobody younger left
    assert ids(out.decodes) == ["old"]
    assert ids(out.preempted) == ["young", "mid"]
    assert ids(sched.waiting) == ["mid", "young", "late"] and not out.prefills
    assert all(s.status is SeqStatus.WAITING and not s.block_table and s.num_cached == 0
               for s in out.preempted)
    assert sched.num_preemptions == 2
    advance(sched, out)
    sched.finish(sched.running[0])        # old done: the preempted come back, oldest first
    out = sched.schedule()
    assert ids(out.prefills) == ["mid"]                   # 5 tokens (recomputed with its output): 2 blocks
    assert out.prefills[0].num_tokens == 5
    assert ids(sched.waiting) == ["young", "late"]        # 1 block left: young waits, late may not pass


def test_lone_sequence_preempts_itself_only_when_nothing_else():
    sched, _ = make(num_blocks=1, block_size=4)
    sched.add(seq("a", 4))
    out = sched.schedule()
    advance(sched, out)
    out = sched.schedule()
    assert ids(out.preempted) == ["a"] and not out.decodes


def hold_setup(hold: int):
    """One sequence decoding, then a ready prompt and one whose adapter is pending."""
    gate = FakeGate()
    sched = Scheduler(BlockManager(64, 4), gate, 8, 64, hold_prefill_steps=hold)
    sched.add(seq("running"))
    advance(sched, sched.schedule())
    gate.pending.add("slow")
    sched.add(seq("ready"))
    sched.add(seq("late", adapter="slow"))
    return sched, gate


def test_ready_prompts_wait_for_a_pending_adapter_up_to_the_hold():
    sched, gate = hold_setup(hold=2)
    for _ in range(2):                                   # held: the step only decodes
        out = sched.schedule()
        assert ids(out.decodes) == ["running"] and not out.prefills
        advance(sched, out)
    out = sched.schedule()                               # the hold is used up: admitted alone
    assert ids(out.prefills) == ["ready"] and sched.num_held_steps == 2
    advance(sched, out)
    gate.pending.clear()
    assert ids(sched.schedule().prefills) == ["late"]


def test_held_prompts_join_the_pending_one_when_it_is_ready():
    sched, gate = hold_setup(hold=3)
    advance(sched, sched.schedule())
    gate.pending.clear()                                 # the copy landed: one prompt step for both
    assert ids(sched.schedule().prefills) == ["ready", "late"]


def test_no_hold_when_off_idle_or_full():
    sched, _ = hold_setup(hold=0)
    assert ids(sched.schedule().prefills) == ["ready"]    # off: admitted at once
    gate = FakeGate()
    gate.pending.add("slow")
    idle = Scheduler(BlockManager(64, 4), gate, 8, 64, hold_prefill_steps=2)
    idle.add(seq("ready"))
    idle.add(seq("late", adapter="slow"))
    assert ids(idle.schedule().prefills) == ["ready"]     # nothing decoding: the GPU would idle
    sched, _ = hold_setup(hold=2)
    sched.waiting[0].request.prompt_token_ids[:] = [1] * 63
    assert ids(sched.schedule().prefills) == ["ready"]    # the ready prompts fill the step already
