"""Paged-attention decode: one new query token per sequence over its paged KV cache.

Math (reference: kernels.reference.paged_attention_decode_ref), for sequence b, head h,
kv head g = h // (Hq // Hkv), n = context_lens[b]:
    out[b, h] = softmax_j(scale * q[b, h] · K[b, j, g]) @ V[b, :, g],  j < n,
    where token j of b lives in cache block block_tables[b, j // block_size], row j % block_size.

Design. Grid (B * Hkv, P): one program per (sequence, kv head, partition of PARTITION
context tokens), computing all Hq/Hkv query heads of the group together, so each K/V
row is read once (GQA). Online softmax (exp2) over BLOCK_N-token chunks gathered
through the block table; QKᵀ and PV with tl.dot (the head group padded to 16 rows).
P = ceil(max_blocks * block_size / PARTITION) comes from the block-table shape, not
from context_lens (no host sync, CUDA-graph capturable); partitions past a sequence's
length exit at once. With P > 1 each partition writes its normalized output, running
max and sum (fp32), and a second kernel merges them (split-K / flash-decoding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_contiguous, check_device
from kernels.tiles import cdiv, next_pow2

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attn_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
                       qk_scale, MAX_BLOCKS, HQ, HKV, NUM_PARTS,
                       GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
                       SINGLE: tl.constexpr, IEEE: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bh // HKV
    g = pid_bh % HKV
    n = tl.load(lens_ptr + b)
    p_lo = pid_p * PARTITION
    if (p_lo >= n) & (p_lo > 0):
        return
    p_hi = tl.minimum(p_lo + PARTITION, n)

    offs_h = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_j = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GROUP
    heads = g * GROUP + offs_h
    q = tl.load(q_ptr + (b * HQ + heads)[:, None] * HEAD_DIM + offs_d[None, :], mask=h_mask[:, None], other=0.0)

    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    row_stride = HKV * HEAD_DIM
    for j0 in range(p_lo, p_hi, BLOCK_N):
        tok = j0 + offs_j
        j_mask = tok < p_hi
        blk = tl.load(bt_ptr + b.to(tl.int64) * MAX_BLOCKS + tok // BLOCK_SIZE, mask=j_mask, other=0)
        rows = blk.to(tl.int64) * BLOCK_SIZE + tok % BLOCK_SIZE
        kv_off = rows[:, None] * row_stride + g * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=j_mask[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=j_mask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(j_mask[None, :], s * qk_scale, float("-inf"))        # log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SINGLE:
        tl.store(out_ptr + (b * HQ + heads)[:, None] * HEAD_DIM + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])
    else:
        part = (b * HQ + heads) * NUM_PARTS + pid_p                            # [B, Hq, P]
        tl.store(po_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=h_mask[:, None])
        tl.store(pm_ptr + part, m_i, mask=h_mask)
        tl.store(pl_ptr + part, l_i, mask=h_mask)


@triton.jit
def _paged_attn_reduce_kernel(po_ptr, pm_ptr, pl_ptr, lens_ptr, out_ptr, HQ, NUM_PARTS,
                              HEAD_DIM: tl.constexpr, PARTS_PAD: tl.constexpr, PARTITION: tl.constexpr):
    pid = tl.program_id(0)                                                 # b * HQ + h
    n = tl.load(lens_ptr + pid // HQ)
    offs_p = tl.arange(0, PARTS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    p_mask = offs_p < tl.cdiv(n, PARTITION)
    m = tl.load(pm_ptr + pid * NUM_PARTS + offs_p, mask=p_mask, other=float("-inf"))
    l_p = tl.load(pl_ptr + pid * NUM_PARTS + offs_p, mask=p_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(p_mask, l_p * tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0)), 0.0)
    o = tl.load(po_ptr + (pid * NUM_PARTS + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=p_mask[:, None], other=0.0)
    w_sum = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)
    tl.store(out_ptr + pid * HEAD_DIM + offs_d, res.to(out_ptr.dtype.element_ty))


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           *, partition: int | None = None, block_n: int | None = None,
                           num_warps: int = 4) -> torch.Tensor:
    """Returns out [B, Hq, D] (q's dtype); see the module docstring for the math.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (q's dtype; block_size a
    power of two; D a power of two >= 16, e.g. 64 or 128); block_tables [B, max_blocks] int32;
    context_lens [B] int32 (0 gives zeros). All contiguous. No host-device sync.
    """
    check_device(q, k_cache, v_cache, block_tables, context_lens)
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"need q [B, Hq, D] and equal caches [blocks, block_size, Hkv, D]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"head dim {head_dim} vs cache {cache_dim}, or Hq {num_heads} not a multiple of "
                         f"Hkv {num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"head_dim ({head_dim}) must be a power of two >= 16 and block_size "
                         f"({block_size}) a power of two")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or q.dtype not in (
            torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q and caches must share one float dtype: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be [B={num_seqs}, max_blocks] int32, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if context_lens.shape != (num_seqs,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be [B={num_seqs}] int32, got {tuple(context_lens.shape)} "
                         f"{context_lens.dtype}")
    check_contiguous(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                     context_lens=context_lens)
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    max_ctx = max(1, max_blocks * block_size)
    if partition is None:
        # enough programs to fill the GPU for small batches, few partials for big ones
        # (H200 sweep, bench/notes/kernels.md)
        work = num_seqs * num_kv_heads
        partition = 256 if work <= 64 else (512 if work < 512 else 1024)
    block_n = block_n or min(64, partition)
    if partition % block_n:
        raise ValueError(f"partition {partition} must be a multiple of block_n {block_n}")
    num_parts = cdiv(max_ctx, partition)
    single = num_parts == 1
    if single:
        po = pm = pl = out                                                   # unused
    else:
        po = torch.empty((num_seqs, num_heads, num_parts, head_dim), device=q.device, dtype=torch.float32)
        pm = torch.empty((num_seqs, num_heads, num_parts), device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
    _paged_attn_kernel[(num_seqs * num_kv_heads, num_parts)](
        q, k_cache, v_cache, block_tables, context_lens, out, po, pm, pl,
        float(scale) * _LOG2E, max_blocks, num_heads, num_kv_heads, num_parts,
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTITION=partition, SINGLE=single,
        IEEE=(q.dtype == torch.float32), num_warps=num_warps)
    if not single:
        _paged_attn_reduce_kernel[(num_seqs * num_heads,)](
            po, pm, pl, context_lens, out, num_heads, num_parts,
            HEAD_DIM=head_dim, PARTS_PAD=next_pow2(num_parts), PARTITION=partition,
            num_warps=4)
    return out
