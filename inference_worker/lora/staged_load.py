"""A load into a slot as one staged copy plus two fill kernels (kernels/slot_fill.py says why).

The slot pool keeps every A/B pool in one device buffer, so a module's rows in slot s
are an element offset into it: A rows of module m of a LoRALinear at
    a_base + s * M*R*in + m * R*in      (contiguous [r, in])
B rows (rank-major [R, N], module columns lo:hi) at
    b_base + s * R*N + lo               (rows N apart)
An adapter whose tensors are views of one buffer in the pool's dtype (a blob read into
pinned memory, inference_worker/blob_reader.py) is copied to a staging region whole;
the fill tables say where each module's A and B go. Others (merges) take the slot
pool's module-by-module copies.
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
    """One tensor over every module's A and B (a view of their shared buffer) and where each
    pair starts in it (element offsets)."""

    tensor: torch.Tensor
    offsets: dict[ModuleKey, tuple[int, int]]


def adapter_span(weights: AdapterWeights, dtype: torch.dtype) -> Span | None:
    """The adapter's tensors as one span, or None when they are not contiguous views of one
    storage in `dtype`."""
    pairs = [(key, a, b) for key, (a, b) in weights.modules.items() if a.numel() and b.numel()]
    if not pairs:
        return None
    storage = pairs[0][1].untyped_storage()
    base, size = storage.data_ptr(), dtype.itemsize
    starts = {}
    for key, a, b in pairs:
        for t in (a, b):
            if t.dtype != dtype or not t.is_contiguous() or t.untyped_storage().data_ptr() != base \
                    or (t.data_ptr() - base) % size:
                return None
        starts[key] = (a.data_ptr(), b.data_ptr())
    lo = min(min(s) for s in starts.values())
    hi = max(max(a.data_ptr() + a.nbytes, b.data_ptr() + b.nbytes) for _, a, b in pairs)
    tensor = torch.empty(0, dtype=dtype, device=pairs[0][1].device).set_(
        storage, (lo - base) // size, ((hi - lo) // size,))
    return Span(tensor, {key: ((a - lo) // size, (b - lo) // size) for key, (a, b) in starts.items()})


def fill_tables(targets: dict[ModuleKey, ModuleRows], weights: AdapterWeights, span: Span, slot: int,
                dirty_rank: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The fill entries of loading `weights` (staged as `span`) into `slot`: per module, its
    A and B rows, then zeros up to dirty_rank (rows an earlier occupant may have left)."""
    rows, transposed = [], []
    for key, where in targets.items():
        a_src, b_src = span.offsets.get(key, (0, 0))
        pair = weights.modules.get(key)
        r = pair[0].shape[0] if pair is not None and key in span.offsets else 0
        n = max(r, dirty_rank)
        if n == 0:
            continue                                  # nothing there, nothing to write
        rows.append((a_src, where.a_base + slot * where.a_slot_stride, r * where.in_features,
                     n * where.in_features))
        transposed.append((b_src, where.b_base + slot * where.b_slot_stride, where.out_features, r, n,
                           where.b_row_stride))
    return rows, transposed
