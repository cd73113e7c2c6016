"""Device slots for LoRA adapters: A/B buffers allocated once, adapters copied in and out.

Per LoRALinear of the model (per layer: fused qkv, o, fused gate_up, down):
  a_pool [S, M, R, in]   b_pool [S, R, N]     (S = max slots, R = max rank, M fused modules)
plus slot_ranks [S] int32 and slot_scales [S] float32, which every step's LoraBatchMeta
points at. Loading an adapter zeroes its slot then copies each module's A/B into the
top-left corner (ranks padded with zeros; modules the adapter lacks stay zero, so they
add nothing). Nothing is allocated after start, so the buffers' addresses are stable
(CUDA graphs can capture them).

On CUDA a load is asynchronous: its copies (from pinned CPU memory) run on a side
stream and end with an event. `is_loaded` polls that event (the scheduler admits a
sequence only once its adapter is in, so no step waits for a copy), and
`wait_for_loads` makes the compute stream wait for the loads of a step's slots on the
device (LoadAdapter pins may be used by the next step).

A load on CUDA is staged (lora/staged_load.py): the adapter, whose tensors are views of
a few pinned buffers (a merge's tensors are each their own), goes to a staging region in
one copy per buffer, and two fill kernels scatter it into the slot, zeroing rows a
higher-rank occupant left. An adapter in another dtype than the pool's is copied module by
module instead (~450 copies for a Llama-3-8B adapter, converting).

With load_thread, loads are issued by a loader thread, so their host work (a few CUDA
calls staged, ~10 ms of them module by module) never holds up the running batch's next
step. A load is then a Future of its done event; `wait_for_loads` waits on the host only
for a load the step needs that is not issued yet (a sequence admitted with its adapter in
the same step).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from inference_worker.adapter_weights import AdapterWeights
from inference_worker.device import use_device
from inference_worker.lora.layers import LoRALinear
from inference_worker.lora.policy import CachePolicy, LRUPolicy
from inference_worker.lora.staged_load import ModuleRows, Span, TableStaging, adapter_span, fill_tables
from services.errors import FailedPrecondition


class SlotPool:
    def __init__(self, lora_layers: list[tuple[int, LoRALinear]], num_slots: int, max_rank: int,
                 max_tokens: int, device: torch.device, dtype: torch.dtype,
                 policy: CachePolicy | None = None, load_thread: bool = False,
                 staged_loads: bool | None = None) -> None:
        """load_thread: issue loads from a loader thread (EngineConfig.adapter_load_thread).
        staged_loads: load an adapter as one copy plus fill kernels (lora/staged_load.py; default
        on CUDA; on CPU only with TRITON_INTERPRET=1, for tests)."""
        self.num_slots, self.max_rank = num_slots, max_rank
        self.policy = policy or LRUPolicy()
        self.num_layers = 1 + max((i for i, _ in lora_layers), default=-1)
        # (layer, PEFT module name) -> (layer module, index of the module in its fused group)
        self._targets: dict[tuple[int, str], tuple[LoRALinear, int]] = {}
        self._rows: dict[tuple[int, str], ModuleRows] = {}   # the same, as offsets into self._buffer
        self.staged_loads = device.type == "cuda" if staged_loads is None else staged_loads
        sizes = [(len(lin.module_names) * max_rank * lin.in_features, max_rank * lin.out_offsets[-1])
                 for _, lin in lora_layers]
        per_slot = sum(a + b for a, b in sizes)
        # one buffer for every pool (a load's fill kernels address all of them from one base),
        # plus a slot-sized staging region for the staged copy of an adapter
        self._buffer = torch.zeros(num_slots * per_slot + (per_slot if self.staged_loads else 0),
                                   device=device, dtype=dtype)
        self._staging = self._buffer[num_slots * per_slot:]
        offset, max_fused = 0, 1
        for (layer_idx, lin), (a_size, b_size) in zip(lora_layers, sizes):
            num_modules, n = len(lin.module_names), lin.out_offsets[-1]
            max_fused = max(max_fused, num_modules)
            lin.a_pool = self._buffer[offset: offset + num_slots * a_size].view(
                num_slots, num_modules, max_rank, lin.in_features)
            # rank-major: a rank row is N contiguous values, so the expand reads only an adapter's
            # own rows whatever R (kernels/sgmv_expand.py)
            b_offset = offset + num_slots * a_size
            lin.b_pool = self._buffer[b_offset: b_offset + num_slots * b_size].view(num_slots, max_rank, n)
            for m, name in enumerate(lin.module_names):
                self._targets[(layer_idx, name)] = (lin, m)
                self._rows[(layer_idx, name)] = ModuleRows(
                    offset + m * max_rank * lin.in_features, a_size, lin.in_features,
                    b_offset + lin.out_offsets[m], b_size, lin.out_offsets[m + 1] - lin.out_offsets[m], n)
            offset = b_offset + num_slots * b_size
        self._tables: TableStaging | None = None
        if self.staged_loads:
            from kernels.slot_fill import ROWS_FIELDS, TRANSPOSED_FIELDS  # Triton: only where loads use it
            # a load's fill tables: at most one A entry and one B entry per module; a buffer per
            # slot (a load takes a slot, so more are rarely in flight; if they are, the ring waits)
            self._tables = TableStaging(len(self._rows) * (ROWS_FIELDS + TRANSPOSED_FIELDS), device,
                                        depth=min(num_slots, 256))
        scratch = torch.zeros(max_tokens * max_fused * max_rank, device=device, dtype=torch.float32)
        for _, lin in lora_layers:
            lin.shrink_scratch = scratch
        self._layers = [lin for _, lin in lora_layers]
        self.slot_ranks = torch.zeros(num_slots, device=device, dtype=torch.int32)      # [S]
        self.host_ranks = [0] * num_slots               # slot_ranks as the host knows them (no sync)
        self.slot_scales = torch.zeros(num_slots, device=device, dtype=torch.float32)   # [S]
        self._slot_of: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))    # pop() gives slot 0 first
        self.num_loads = 0
        self.num_evictions = 0
        self.num_staged_loads = 0        # loads that took the staged path (the others copied module by module)
        self.num_step_waits = 0          # steps whose compute had to wait for a copy not yet done
        self.loads_async = device.type == "cuda"
        # high priority: with prompt steps replayed as graphs the compute stream's kernels run back
        # to back, and a load's two fill kernels should not queue behind them. (On the H200 it did
        # not change the slow loads of runs 21-25: those waited on the host, see TableStaging.)
        self._copy_stream = torch.cuda.Stream(device, priority=-1) if self.loads_async else None
        # slot -> its load: the event after its copies, or (loader thread) a Future of that event
        # (None on CPU)
        self._in_flight: dict[int, Future | torch.cuda.Event] = {}
        self._unwaited: dict[int, Future | torch.cuda.Event] = {}   # loads the compute stream has not waited for
        self._loader = (ThreadPoolExecutor(1, thread_name_prefix="slot-loader", initializer=use_device,
                                           initargs=(device,)) if load_thread else None)
        self._dirty_rank = [0] * num_slots                    # rows [0, r) of a slot may be non-zero
        # Set to a list to record loads (benchmarks): (start, end) CUDA events with timing, or
        # (None, seconds) on CPU; the host time from the request to the load issued; the part
        # of it the load waited for the loader thread (0 without one); and the host seconds of
        # the phases of issuing it (issue_phases).
        self.load_timings: list[tuple] | None = None
        self._marks: list[float] = []

    @property
    def layers(self) -> list[LoRALinear]:
        return self._layers

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lin in self._layers for t in (lin.a_pool, lin.b_pool))

    def slot_of(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def resident(self) -> list[str]:
        return list(self._slot_of)

    @property
    def loads_in_background(self) -> bool:
        """A load returns before its copies are done (poll is_loaded)."""
        return self.loads_async or self._loader is not None

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True)

    def is_loaded(self, key: str) -> bool:
        """Resident and its copies done (on CPU: issued, i.e. done)."""
        slot = self._slot_of.get(key)
        if slot is None:
            return False
        load = self._in_flight.get(slot)
        if isinstance(load, Future):
            if not load.done():
                return False
            load = self._loaded_event(slot, load)
        if load is not None and not load.query():
            return False
        self._in_flight.pop(slot, None)
        return True

    def settle(self) -> None:
        """Wait until the loader thread has issued every load handed to it. For tests that need a
        schedule independent of the loader's timing (which sequences a step admits depends on
        it); serving never calls it."""
        wait([load for load in self._in_flight.values() if isinstance(load, Future)])

    def wait_for_loads(self, slots: Iterable[int]) -> None:
        """The compute stream waits (on the device) for the loads of `slots` (a step's); on the
        host only for such a load that the loader has not issued yet."""
        waited = False
        for slot in [s for s in slots if s in self._unwaited]:
            load = self._unwaited.pop(slot)
            if isinstance(load, Future):
                waited = waited or not load.done()
                load = self._loaded_event(slot, load)
            if load is not None:
                waited = waited or not load.query()
                torch.cuda.current_stream(self._copy_stream.device).wait_event(load)
        self.num_step_waits += waited

    def _loaded_event(self, slot: int, future: Future) -> torch.cuda.Event | None:
        """The done event of a loader-thread load (None on CPU), waiting for the loader to issue
        it if need be. A failed load frees its slot (its rows are unknown: the next load zeroes
        them) and raises."""
        try:
            event = future.result()
        except Exception:
            self._in_flight.pop(slot, None)
            self._unwaited.pop(slot, None)
            self._dirty_rank[slot] = self.max_rank
            key = next((k for k, s in self._slot_of.items() if s == slot), None)
            if key is not None:
                self._evict(key)
            raise
        if self._in_flight.get(slot) is future:          # later polls query the event itself
            self._in_flight[slot] = event
        return event

    def num_unpinned(self) -> int:
        """Slots a new adapter could take now (empty, or holding an idle adapter)."""
        return len(self._free) + sum(1 for key in self._slot_of if not self.policy.is_pinned(key))

    def check(self, weights: AdapterWeights) -> int:
        """Raise FailedPrecondition unless the adapter fits this model and the slots; return its rank."""
        rank = weights.rank
        for (layer, name), (a, b) in weights.modules.items():
            target = self._targets.get((layer, name))
            if target is None:
                raise FailedPrecondition(f"adapter {weights.key}: no module {name} in layer {layer} of this model")
            lin, m = target
            out = lin.out_offsets[m + 1] - lin.out_offsets[m]
            r = a.shape[0]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != lin.in_features or tuple(b.shape) != (out, r):
                raise FailedPrecondition(
                    f"adapter {weights.key}: layer {layer} {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                    f"this model needs A [r, {lin.in_features}], B [{out}, r]")
            rank = max(rank, r)
        if rank > self.max_rank:
            raise FailedPrecondition(f"adapter {weights.key}: rank {rank} > the worker's max_lora_rank {self.max_rank}")
        return rank

    def acquire(self, key: str, weights: Callable[[], AdapterWeights]) -> int | None:
        """Pin `key` in a slot, loading it (evicting the policy's victim) if not resident.

        Returns the slot, or None when every slot is pinned. Raises FailedPrecondition when
        the adapter does not fit this model (nothing is evicted then).
        """
        slot = self._slot_of.get(key)
        if slot is None:
            if not self._free and self.policy.victim() is None:
                return None
            adapter = weights()
            rank = self.check(adapter)            # before evicting anything
            slot = self._take_slot()
            self._load(slot, adapter, rank)
            self._slot_of[key] = slot
        self.policy.touch(key)
        self.policy.pin(key)
        return slot

    def release(self, key: str) -> None:
        """One user fewer; the adapter stays resident until it is a victim."""
        self.policy.unpin(key)

    def evict_if_idle(self, key: str) -> bool:
        """Free the slot of `key` now unless it is pinned. True when it was evicted."""
        if key not in self._slot_of or self.policy.is_pinned(key):
            return False
        self._evict(key)
        return True

    def _take_slot(self) -> int:
        if not self._free:
            self._evict(self.policy.victim())
        return self._free.pop()

    def _evict(self, key: str) -> None:
        self._free.append(self._slot_of.pop(key))
        self.policy.remove(key)
        self.num_evictions += 1

    @torch.no_grad()
    def _load(self, slot: int, adapter: AdapterWeights, rank: int) -> None:
        host_start = time.perf_counter()
        queued = None
        if self._copy_stream is not None:
            # the copies must follow the work already queued (a step may still read the evicted
            # adapter's slot): an event on the compute stream now, waited by the copy stream
            queued = torch.cuda.Event()
            queued.record(torch.cuda.current_stream(self._copy_stream.device))
        if self._loader is not None:
            load = self._loader.submit(self._issue_load, slot, adapter, rank, queued, host_start)
        else:
            load = self._issue_load(slot, adapter, rank, queued, host_start)
        self.host_ranks[slot] = rank
        if load is not None:                              # the event (or its Future) who needs the slot waits for
            self._in_flight[slot] = self._unwaited[slot] = load
        self.num_loads += 1

    @torch.no_grad()
    def _issue_load(self, slot: int, adapter: AdapterWeights, rank: int, queued: torch.cuda.Event | None,
                    host_start: float) -> torch.cuda.Event | None:
        """The copies of one load (on the loader thread, if any); -> the event after them on the
        copy stream (None on CPU, where the copies are done on return)."""
        self._marks = [time.perf_counter()]
        queue_s = self._marks[0] - host_start
        if self._copy_stream is None:
            self._fill(slot, adapter, rank)
            if self.load_timings is not None:         # synchronous: issued = done
                elapsed = time.perf_counter() - host_start
                self.load_timings.append((None, elapsed, elapsed, queue_s, self.issue_phases()))
            return None
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(queued)
            start = torch.cuda.Event(enable_timing=True) if self.load_timings is not None else None
            if start is not None:
                start.record()
            self._marks.append(time.perf_counter())
            self._fill(slot, adapter, rank)
            done = torch.cuda.Event(enable_timing=start is not None)
            done.record()
        self._marks.append(time.perf_counter())
        if start is not None:
            self.load_timings.append((start, done, time.perf_counter() - host_start, queue_s, self.issue_phases()))
        return done

    # the phases of a staged load's issue on CUDA, in issue_phases' order
    ISSUE_PHASES = ("setup", "tables", "copies", "launch", "done")

    def issue_phases(self) -> tuple[float, ...]:
        """Host seconds of the phases of the last load's issue (ISSUE_PHASES on CUDA): the copy
        stream set up (its wait and start event), the fill's tables prepared, its copies issued,
        its fill kernels launched, the slot's rank and scale written and the done event recorded
        (module-by-module fills: setup, copies, done; on the CPU: the fill alone)."""
        marks = self._marks
        return tuple(b - a for a, b in zip(marks, marks[1:]))

    def _fill(self, slot: int, adapter: AdapterWeights, rank: int) -> None:
        """Write the adapter into the slot (on the current stream): staged when it can be."""
        span = adapter_span(adapter, self._buffer.dtype) if self.staged_loads else None
        if span is None or span.numel > self._staging.numel():
            self._copy_into(slot, adapter)
            self._marks.append(time.perf_counter())
        else:
            self._staged_fill(slot, adapter, span)
            self.num_staged_loads += 1
        self._dirty_rank[slot] = rank
        self.slot_ranks[slot] = rank
        self.slot_scales[slot] = adapter.scaling

    def _staged_fill(self, slot: int, adapter: AdapterWeights, span: Span) -> None:
        # Triton: imported only where loads use it
        from kernels.slot_fill import ROWS_FIELDS, TRANSPOSED_FIELDS, fill_slot

        rows, transposed = fill_tables(self._rows, adapter, span, slot, self._dirty_rank[slot])
        flat = [v for entry in rows for v in entry] + [v for entry in transposed for v in entry]
        self._marks.append(time.perf_counter())
        offset = 0
        for chunk in span.chunks:                     # one copy per host buffer of the adapter
            self._staging[offset: offset + chunk.numel()].copy_(chunk, non_blocking=True)
            offset += chunk.numel()
        # both tables in one small copy, from a pinned buffer allocated once (staged_load.TableStaging says why)
        tables = self._tables.upload(flat)
        self._marks.append(time.perf_counter())
        split = ROWS_FIELDS * len(rows)
        fill_slot(self._staging[:offset], self._buffer, tables[:split].view(-1, ROWS_FIELDS),
                  tables[split:].view(-1, TRANSPOSED_FIELDS))
        self._marks.append(time.perf_counter())

    def warm_fill(self) -> None:
        """Compile the fill kernels now (one variant per pool dtype), not in the first load: one
        zero written into the staging region by each."""
        if not self.staged_loads:
            return
        from kernels.slot_fill import ROWS_FIELDS, TRANSPOSED_FIELDS, fill_slot

        at = self._buffer.numel() - self._staging.numel()      # the staging region, in dst offsets
        tables = torch.tensor([0, at, 0, 1] + [0, at, 1, 0, 1, 1], dtype=torch.int64, device=self._buffer.device)
        fill_slot(self._staging, self._buffer, tables[:ROWS_FIELDS].view(1, ROWS_FIELDS),
                  tables[ROWS_FIELDS:].view(1, TRANSPOSED_FIELDS))

    def _copy_into(self, slot: int, adapter: AdapterWeights) -> None:
        # Zero the slot only when a row the new adapter does not overwrite may be non-zero: a
        # module it lacks, or a rank below the last occupant's (saves 8 launches per layer).
        covers = len(adapter.modules) == len(self._targets)
        min_rank = min((a.shape[0] for a, _ in adapter.modules.values()), default=0)
        if not covers or min_rank < self._dirty_rank[slot]:
            torch._foreach_zero_([t[slot] for lin in self._layers for t in (lin.a_pool, lin.b_pool)])
        # One foreach call issues the 2 x modules x layers copies from C++ (a Python loop of
        # copy_ costs ~17 µs each: 7.7 ms of host time per Llama-3-8B adapter, measured).
        # non_blocking: from pinned CPU memory the copies run asynchronously, in stream order.
        dsts, srcs = [], []
        for (layer, name), (a, b) in adapter.modules.items():
            lin, m = self._targets[(layer, name)]
            r = a.shape[0]
            lo, hi = lin.out_offsets[m], lin.out_offsets[m + 1]
            # B [out, r] lands transposed: into a [out, r] view of the rank-major slot (strided, so
            # the copy goes through a device buffer then a device transpose; the source stays a
            # plain pinned read)
            dsts += [lin.a_pool[slot, m, :r], lin.b_pool[slot, :r, lo:hi].t()]
            srcs += [a, b]
        if dsts:
            torch._foreach_copy_(dsts, srcs, non_blocking=True)
