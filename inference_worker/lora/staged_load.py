"""A load into a slot as one staged copy plus two fill kernels (kernels/slot_fill.py says why).

The slot pool keeps every A/B pool in one device buffer, so a module's rows in slot s
are an element offset into it: A rows of module m of a LoRALinear at
    a_base + s * M*R*in + m * R*in      (contiguous [r, in])
B rows (rank-major [R, N], module columns lo:hi) at
    b_base + s * R*N + lo               (rows N apart)
An adapter whose tensors are views of a few buffers in the pool's dtype (a blob read into
pinned memory, inference_worker/blob_reader.py) is copied to a staging region in one copy
per buffer (a merge's tensors are each their own buffer); the fill tables say where each
module's A and B go. Adapters in another dtype than the pool's, or not contiguous, take the
slot pool's module-by-module copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from inference_worker.adapter_weights import AdapterWeights, ModuleKey


@dataclass(frozen=True)
class ModuleRows:
    """Where one (layer, module) of the model lives in the pool buffer."""

    a_base: int            # element offset of slot 0's A rows
    a_slot_stride: int     # elements from one slot's rows to the next
    in_features: int
    b_base: int            # element offset of slot 0's B rows (column lo of row 0)
    b_slot_stride: int
    out_features: int      # hi - lo: the module's columns
    b_row_stride: int      # N: all columns of the fused projection


@dataclass(frozen=True)
class Span:
    """The adapter as a few host tensors to copy one after another into the staging region
    (each a view over one buffer of the adapter's), and where each module's A and B then start
    there (element offsets)."""

    chunks: list[torch.Tensor]
    offsets: dict[ModuleKey, tuple[int, int]]

    @property
    def numel(self) -> int:
        return sum(c.numel() for c in self.chunks)


def adapter_span(weights: AdapterWeights, dtype: torch.dtype) -> Span | None:
    """The adapter's tensors as one chunk per buffer they are views of (a blob read into pinned
    memory is a few buffers, inference_worker/blob_reader.py), or None when a tensor is not a
    contiguous view in `dtype`."""
    pairs = [(key, a, b) for key, (a, b) in weights.modules.items() if a.numel() and b.numel()]
    size = dtype.itemsize
    buffers: dict[int, list] = {}                    # storage address -> [storage, lo, hi]
    for _, a, b in pairs:
        for t in (a, b):
            storage = t.untyped_storage()
            if t.dtype != dtype or not t.is_contiguous() or (t.data_ptr() - storage.data_ptr()) % size:
                return None
            extent = buffers.setdefault(storage.data_ptr(), [storage, t.data_ptr(), t.data_ptr() + t.nbytes])
            extent[1], extent[2] = min(extent[1], t.data_ptr()), max(extent[2], t.data_ptr() + t.nbytes)
    if not pairs:
        return None
    chunks, start_of, staged = [], {}, 0             # start_of: storage address -> (lo, staging offset)
    for base, (storage, lo, hi) in buffers.items():
        chunks.append(torch.empty(0, dtype=dtype, device=pairs[0][1].device).set_(
            storage, (lo - base) // size, ((hi - lo) // size,)))
        start_of[base] = (lo, staged)
        staged += (hi - lo) // size

    def staged_at(t: torch.Tensor) -> int:
        lo, offset = start_of[t.untyped_storage().data_ptr()]
        return offset + (t.data_ptr() - lo) // size

    return Span(chunks, {key: (staged_at(a), staged_at(b)) for key, a, b in pairs})


def fill_tables(targets: dict[ModuleKey, ModuleRows], weights: AdapterWeights, span: Span, slot: int,
                dirty_rank: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The fill entries of loading `weights` (staged as `span`) into `slot`: per module, its
    A and B rows, then zeros up to dirty_rank (rows an earlier occupant may have left)."""
    rows, transposed = [], []
    for key, where in targets.items():
        # a module the adapter lacks (or has at rank 0) is not in the span: zeros only
        a_src, b_src = span.offsets.get(key, (0, 0))
        r = weights.modules[key][0].shape[0] if key in span.offsets else 0
        n = max(r, dirty_rank)
        if n == 0:
            continue                                  # nothing there, nothing to write
        rows.append((a_src, where.a_base + slot * where.a_slot_stride, r * where.in_features,
                     n * where.in_features))
        transposed.append((b_src, where.b_base + slot * where.b_slot_stride, where.out_features, r, n,
                           where.b_row_stride))
    return rows, transposed


class TableStaging:
    """Host staging of a load's fill tables: a ring of buffers allocated once (pinned on CUDA).

    Why not `torch.tensor(tables).pin_memory()` per load: PyTorch's pinned-memory cache recycles a
    freed block only once the events of every block freed before it have completed, in order. A
    load's table copy runs on the copy stream after the compute work queued before the load (one
    or two steps), so its block held back the cache, and later pinned allocations (this one, the
    sampler's token copies) went to cudaHostAlloc, which waits for the device to go idle. On the
    H200 with prompt steps as CUDA graphs (the GPU always busy), a load took 100-158 ms p50 of
    host time to issue, against 9-34 ms before (bench/results/engine-h200-runs.md, session 7).
    A ring buffer is reused only after the copy from it ran (its own event, waited on the
    loader's thread; with a buffer per slot, `depth` loads later that copy has long run).
    """

    def __init__(self, max_ints: int, device: torch.device, depth: int = 16, event_factory=None) -> None:
        pin = device.type == "cuda"
        self.device = device
        self._bufs = torch.zeros((depth, max_ints), dtype=torch.int64, pin_memory=pin)
        self._host = self._bufs.numpy()
        self._event_factory = event_factory or (torch.cuda.Event if pin else None)
        self._events: list = [None] * depth
        self._next = 0

    def upload(self, flat: list[int]) -> torch.Tensor:
        """flat -> a device tensor [len(flat)] int64, copied on the current stream (async on CUDA)."""
        if len(flat) > self._bufs.shape[1]:
            raise ValueError(f"{len(flat)} table entries > the staging's {self._bufs.shape[1]}")
        i = self._next
        self._next = (i + 1) % len(self._events)
        if self._events[i] is not None:
            self._events[i].synchronize()             # the copy from this buffer has run
        self._host[i, : len(flat)] = flat
        out = self._bufs[i, : len(flat)].to(self.device, non_blocking=True, copy=True)
        if self._event_factory is not None:
            self._events[i] = self._event_factory()
            self._events[i].record()
        return out
