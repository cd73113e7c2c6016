"""Fill an adapter slot from one staged copy of the adapter: two launches instead of ~450 copies.

Why: copying a Llama-3-8B adapter module by module is ~450 host->device copies, half of
them into transposed (rank-major) B rows, each a temporary buffer plus a transpose kernel:
~10 ms of CUDA API calls per load. Issued from the loader thread they contend with the
engine thread's kernel launches (H200, issue 9's S1000: an eager step's launches took
60 ms with loads running beside them, 37 ms with loads issued inline instead). Here the
adapter goes to the device in one copy per host buffer (a blob read into pinned memory is
a few, inference_worker/blob_reader.py), then these kernels scatter it into the slot.

Both kernels read `src` (the staged adapter) and write `dst` (one buffer holding every
A/B pool, inference_worker/lora/slot_pool.py) at element offsets given per entry, so
one launch serves every module of every layer. Rows past an entry's valid rows are
written as zeros (the rows an earlier, higher-rank occupant left).

- fill_rows: entry (src_off, dst_off, valid, total): dst[dst_off + k] = src[src_off + k]
  for k < valid, 0 for valid <= k < total (an A block [r, in] is contiguous in the pool).
- fill_transposed: entry (src_off, dst_off, cols, valid_rows, rows, dst_stride):
  dst[dst_off + i * dst_stride + j] = src[src_off + j * valid_rows + i] for i < valid_rows,
  0 for valid_rows <= i < rows, j < cols (B [out, r] lands rank-major, [r, out] rows).

Grid (entries, NPROG): program p of an entry walks its blocks p, p + NPROG, ...
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_contiguous, check_device

ROWS_FIELDS, TRANSPOSED_FIELDS = 4, 6      # int64 fields per entry of each table
_NPROG = 16                                # programs per entry: blocks spread over SMs


@triton.jit
def _fill_rows_kernel(src_ptr, dst_ptr, table_ptr, NPROG: tl.constexpr, BLOCK: tl.constexpr):
    entry = table_ptr + tl.program_id(0).to(tl.int64) * 4
    src_off, dst_off = tl.load(entry), tl.load(entry + 1)
    valid, total = tl.load(entry + 2), tl.load(entry + 3)
    for start in range(tl.program_id(1) * BLOCK, total, NPROG * BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        v = tl.load(src_ptr + src_off + offs, mask=offs < valid, other=0.0)
        tl.store(dst_ptr + dst_off + offs, v.to(dst_ptr.dtype.element_ty), mask=offs < total)


@triton.jit
def _fill_transposed_kernel(src_ptr, dst_ptr, table_ptr, NPROG: tl.constexpr, BLOCK_I: tl.constexpr,
                            BLOCK_J: tl.constexpr):
    entry = table_ptr + tl.program_id(0).to(tl.int64) * 6
    src_off, dst_off = tl.load(entry), tl.load(entry + 1)
    cols, valid_rows, rows, dst_stride = tl.load(entry + 2), tl.load(entry + 3), tl.load(entry + 4), tl.load(entry + 5)
    col_blocks = tl.cdiv(cols, BLOCK_J)
    for tile in range(tl.program_id(1), tl.cdiv(rows, BLOCK_I) * col_blocks, NPROG):
        i = (tile // col_blocks) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
        j = (tile % col_blocks) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
        # src is [cols, valid_rows] (B [out, r]): element (i, j) sits at j * valid_rows + i
        v = tl.load(src_ptr + src_off + j[None, :] * valid_rows + i[:, None],
                    mask=(i[:, None] < valid_rows) & (j[None, :] < cols), other=0.0)
        tl.store(dst_ptr + dst_off + i[:, None] * dst_stride + j[None, :], v.to(dst_ptr.dtype.element_ty),
                 mask=(i[:, None] < rows) & (j[None, :] < cols))


def fill_slot(src: torch.Tensor, dst: torch.Tensor, rows_table: torch.Tensor,
              transposed_table: torch.Tensor) -> None:
    """Run both fills on the current stream. src/dst 1-D, tables [E, 4] / [E, 6] int64 on the
    device (module docstring); every offset must lie inside src/dst (the caller builds them)."""
    check_device(src, dst, rows_table, transposed_table)
    if src.dim() != 1 or dst.dim() != 1:
        raise ValueError(f"src and dst must be 1-D, got {tuple(src.shape)}, {tuple(dst.shape)}")
    for table, width in ((rows_table, ROWS_FIELDS), (transposed_table, TRANSPOSED_FIELDS)):
        if table.dim() != 2 or table.shape[1] != width or table.dtype != torch.int64:
            raise ValueError(f"a fill table must be [E, {width}] int64, got {tuple(table.shape)} {table.dtype}")
    check_contiguous(src=src, dst=dst, rows_table=rows_table, transposed_table=transposed_table)
    if rows_table.shape[0]:
        _fill_rows_kernel[(rows_table.shape[0], _NPROG)](src, dst, rows_table, NPROG=_NPROG, BLOCK=2048,
                                                          num_warps=4)
    if transposed_table.shape[0]:
        _fill_transposed_kernel[(transposed_table.shape[0], _NPROG)](src, dst, transposed_table, NPROG=_NPROG,
                                                                      BLOCK_I=16, BLOCK_J=128, num_warps=4)


def fill_slot_ref(src: torch.Tensor, dst: torch.Tensor, rows_table: torch.Tensor,
                  transposed_table: torch.Tensor) -> None:
    """The same in plain PyTorch (tests)."""
    for src_off, dst_off, valid, total in rows_table.tolist():
        dst[dst_off: dst_off + total] = 0
        dst[dst_off: dst_off + valid] = src[src_off: src_off + valid]
    for src_off, dst_off, cols, valid_rows, rows, stride in transposed_table.tolist():
        block = dst[dst_off: dst_off + (rows - 1) * stride + cols].as_strided((rows, cols), (stride, 1))
        block.zero_()
        block[:valid_rows] = src[src_off: src_off + cols * valid_rows].view(cols, valid_rows).t()
