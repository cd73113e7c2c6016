"""Write new keys/values into the paged KV cache.

Math (reference: kernels.reference.write_kv_cache_ref):
    k_cache.view(-1, Hkv, D)[slot_mapping[t]] = k[t], same for v, for every t with slot_mapping[t] >= 0.
    k, v [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]; slot_mapping [T] int64
    (block * block_size + offset; negative = skip, e.g. CUDA-graph padding).

One program per (token, chunk of Hkv*D): a copy, no host sync (boolean indexing would sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_contiguous, check_device
from kernels.tiles import cdiv, next_pow2


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ROW, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < ROW
    src = t.to(tl.int64) * ROW + offs
    dst = slot * ROW + offs
    tl.store(kc_ptr + dst, tl.load(k_ptr + src, mask=mask).to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, tl.load(v_ptr + src, mask=mask).to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter k, v [T, Hkv, D] into the caches at slot_mapping [T] (int64 or int32; < 0 skips).

    All contiguous; caches [num_blocks, block_size, Hkv, D] (any float dtype, k/v cast to it).
    """
    check_device(k, v, k_cache, v_cache, slot_mapping)
    if k.dim() != 3 or k.shape != v.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"need k, v [T, Hkv, D] and caches [blocks, block_size, Hkv, D]; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
        raise ValueError(f"cache rows {tuple(k_cache.shape[2:])} != k rows {tuple(k.shape[1:])}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be [T={k.shape[0]}] int64/int32, got "
                         f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    check_contiguous(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    block = min(1024, next_pow2(row))
    _write_kv_kernel[(num_tokens, cdiv(row, block))](k, v, k_cache, v_cache, slot_mapping, row,
                                                           BLOCK=block, num_warps=4)
