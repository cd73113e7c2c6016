"""Rope on the fused q/k/v projection, and the write of the new keys/values into the paged cache.

Math (reference: kernels.reference.rope_and_cache_ref), token t at position p = positions[t],
every head x [D] of q and of k, with x1, x2 its halves and c, s = cos[p], sin[p] (rows [D]):
    rot(x) = x * c + cat(-x2, x1) * s                         (rotate-half / NeoX convention)
    q[t] = rot(q heads of qkv[t]); k[t] = rot(k heads); v[t] = v heads (a copy)
    k_cache.view(-1, Hkv, D)[slot_mapping[t]] = k[t], same for v, when slot_mapping[t] >= 0.
qkv [T, (Hq + 2 Hkv) * D] as [q heads | k heads | v heads]; cos/sin [max_len, D].
fp32 math, one rounding to the dtype (the reference rounds after each torch op).

Grid (T, Hq + Hkv): program (t, h) rotates q head h, or for h >= Hq rotates k head h - Hq
and copies the v head of the same index; k and v go to the outputs and the cache. Positions
and slots are read on the device (no host sync, CUDA-graph capturable); a position must be
< max_len (not checked: that would need a sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_contiguous, check_device
from kernels.tiles import next_pow2


@triton.jit
def _rope_cache_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                       HQ, HKV, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    # both halves of the tables: the reference does not assume cos[:, :D/2] == cos[:, D/2:]
    c1 = tl.load(cos_ptr + pos * HEAD_DIM + offs, mask=mask).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * HEAD_DIM + HALF + offs, mask=mask).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * HEAD_DIM + offs, mask=mask).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * HEAD_DIM + HALF + offs, mask=mask).to(tl.float32)
    src = qkv_ptr + t * (HQ + 2 * HKV) * HEAD_DIM + h * HEAD_DIM        # q head h, or k head h - HQ
    x1 = tl.load(src + offs, mask=mask).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask).to(tl.float32)
    o1 = (x1 * c1 - x2 * s1).to(q_ptr.dtype.element_ty)
    o2 = (x2 * c2 + x1 * s2).to(q_ptr.dtype.element_ty)
    if h < HQ:
        dst = q_ptr + (t * HQ + h) * HEAD_DIM
        tl.store(dst + offs, o1, mask=mask)
        tl.store(dst + HALF + offs, o2, mask=mask)
    else:
        g = h - HQ
        dst = k_ptr + (t * HKV + g) * HEAD_DIM
        tl.store(dst + offs, o1, mask=mask)
        tl.store(dst + HALF + offs, o2, mask=mask)
        v1 = tl.load(src + HKV * HEAD_DIM + offs, mask=mask)
        v2 = tl.load(src + HKV * HEAD_DIM + HALF + offs, mask=mask)
        tl.store(v_ptr + (t * HKV + g) * HEAD_DIM + offs, v1, mask=mask)
        tl.store(v_ptr + (t * HKV + g) * HEAD_DIM + HALF + offs, v2, mask=mask)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:                                                   # negative: padding, skip
            row = (slot * HKV + g) * HEAD_DIM
            tl.store(kc_ptr + row + offs, o1.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(kc_ptr + row + HALF + offs, o2.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptr + row + offs, v1.to(vc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptr + row + HALF + offs, v2.to(vc_ptr.dtype.element_ty), mask=mask)


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   num_heads: int, num_kv_heads: int, head_dim: int,
                   out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> new q [T, Hq, D], k, v [T, Hkv, D] (qkv's dtype), or `out`'s (q, k, v) written;
    writes k, v into the caches.

    qkv [T, (Hq + 2 Hkv) * D] float; positions, slot_mapping [T] int64/int32; cos/sin
    [max_len, D] float; caches [num_blocks, block_size, Hkv, D] (k, v cast to their dtype).
    D even. All contiguous.
    """
    check_device(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping)
    num_tokens = qkv.shape[0]
    row = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != row or head_dim % 2:
        raise ValueError(f"need qkv [T, (Hq + 2 Hkv) * D = {row}] and D even; got {tuple(qkv.shape)}, D {head_dim}")
    if qkv.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"qkv dtype must be bf16, fp16 or fp32, got {qkv.dtype}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != head_dim:
        raise ValueError(f"need cos, sin [max_len, D={head_dim}]; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"need caches [blocks, block_size, Hkv={num_kv_heads}, D={head_dim}]; got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    for name, ids in (("positions", positions), ("slot_mapping", slot_mapping)):
        if ids.shape != (num_tokens,) or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be [T={num_tokens}] int64/int32, got {tuple(ids.shape)} {ids.dtype}")
    check_contiguous(qkv=qkv, positions=positions, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache,
                     slot_mapping=slot_mapping)
    shapes = ((num_tokens, num_heads, head_dim), (num_tokens, num_kv_heads, head_dim), (num_tokens, num_kv_heads, head_dim))
    if out is None:
        q, k, v = (qkv.new_empty(shape) for shape in shapes)
    else:
        q, k, v = out
        for name, t, shape in zip("qkv", out, shapes):
            if tuple(t.shape) != shape or t.dtype != qkv.dtype or not t.is_contiguous():
                raise ValueError(f"out {name} must be contiguous {shape} {qkv.dtype}, got {tuple(t.shape)} {t.dtype}")
    if num_tokens == 0:
        return q, k, v
    half = head_dim // 2
    _rope_cache_kernel[(num_tokens, num_heads + num_kv_heads)](
        qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, q, k, v, num_heads, num_kv_heads,
        HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=next_pow2(half), num_warps=1 if half <= 64 else 2)
    return q, k, v
