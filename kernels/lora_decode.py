"""Fused LoRA for decode steps (EXPERIMENTAL, off unless OPENLORA_FUSED_DECODE=1): shrink and
expand of one projection in ONE launch, for steps whose adapters all have rank <= RB.

Math: out[t, cols of module m] += scale[slot] * (x[t] @ A[slot, m, :r]ᵀ) @ B[slot, :r, cols]
(the reference is sgmv_shrink_ref then sgmv_expand_ref; kernels/reference.py).

Why: at decode an SGMV launch spends a few µs finding its segment and waiting for its first
bytes; a layer's 8 launches cost 90 µs at 64 tokens x 64 rank-16 adapters against a 43 µs
floor (bench/notes/kernels.md). Here a program owns (token tile, module m, column chunk):
it computes y = x @ A_mᵀ for its token(s) in registers ([BLOCK_T, RB], no y round trip
through memory), then adds y @ B to its chunk of columns (2048 by default); the programs of
one token and module share A_m (read from DRAM once, then from L2). So this suits a small A_m (H_in x RB: q/k/v, o, gate/up of a 4096-wide
model at rank <= 16); `down` (H_in 14336) stays on the two-launch path
(kernels.tiles.fused_decode_fits, where the engine decides).

Grid: 1-D over (token tile, chunk), sized from host ints (T, G, the chunk table): CUDA-graph
capturable; chunks never straddle modules (per-module chunk ranges, as sgmv_expand's blocks).

Measured on the H200 (bench/results/fused-sweep-h200.json): no faster than the two launches at
q/k/v and o, 1.8x slower at gate/up (each program streams its 128 KB A_m before its first output);
kept for the record and off by default. Programmatic dependent launch took the launch-gap part
of its purpose (kernels/_common.pdl_enabled).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    block_g_for,
    check_contiguous,
    check_device,
    check_lora_meta,
    check_out_offsets,
    module_of,
    module_table,
    num_tiles_bound,
    segment_tile,
)
from kernels.tiles import next_pow2


@triton.jit(do_not_specialize=["T", "G"])
def _lora_decode_kernel(x_ptr, a_ptr, b_ptr, out_ptr, indptr_ptr, slots_ptr, ranks_ptr, scales_ptr,
                        T, G, H_in, N, NUM_CHUNKS,
                        off1, off2, off3, off4, ch1, ch2, ch3,
                        R: tl.constexpr, M: tl.constexpr, RB: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = pid % NUM_CHUNKS
    pid_tile = pid // NUM_CHUNKS
    tile_start, tile_end, slot, rank = segment_tile(pid_tile, indptr_ptr, slots_ptr, ranks_ptr, T, G,
                                                    BLOCK_G, BLOCK_T)
    if (tile_end <= tile_start) | (slot < 0):
        return
    m, mod_lo, mod_hi, ch_lo = module_of(pid_c, ch1, ch2, ch3, off1, off2, off3, off4)   # the chunk's module
    col_lo = mod_lo + (pid_c - ch_lo) * CHUNK
    col_hi = tl.minimum(col_lo + CHUNK, mod_hi)

    offs_t = tile_start + tl.arange(0, BLOCK_T)
    t_mask = offs_t < tile_end
    offs_r = tl.arange(0, RB)
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    # shrink: y [BLOCK_T, RB] = x[t] @ A[slot, m, :RB]ᵀ, accumulated in [BLOCK_T, RB, BLOCK_K] and
    # reduced over K once (a reduction per step would cross warps every step)
    a_rows = a_ptr + (slot.to(tl.int64) * M + m) * R * H_in + offs_r[:, None].to(tl.int64) * H_in
    x_rows = x_ptr + offs_t[:, None].to(tl.int64) * H_in
    # the next K block is loaded before this one is used: two A blocks in flight per program
    acc3 = tl.zeros((BLOCK_T, RB, BLOCK_K), tl.float32)
    k_mask = offs_k < H_in
    xv_next = tl.load(x_rows + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
    av_next = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
    for k0 in range(0, H_in, BLOCK_K):
        xv = xv_next
        av = av_next
        k_mask = (k0 + BLOCK_K + offs_k) < H_in
        xv_next = tl.load(x_rows + k0 + BLOCK_K + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :],
                          other=0.0)
        av_next = tl.load(a_rows + k0 + BLOCK_K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                          other=0.0)
        acc3 += xv[:, None, :].to(tl.float32) * av[None, :, :].to(tl.float32)
    y = tl.sum(acc3, axis=2)                                           # [BLOCK_T, RB]
    scale = tl.load(scales_ptr + slot)

    # expand: out[t, cols] += scale * y @ B[slot, :RB, cols] (rank rows past the slot's are masked)
    b_rows = b_ptr + slot.to(tl.int64) * R * N + offs_r[:, None] * N                      # R*N < 2^31
    for n0 in range(col_lo, col_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < col_hi
        bv = tl.load(b_rows + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        delta = tl.sum(y[:, :, None] * bv[None, :, :].to(tl.float32), axis=1)          # [BLOCK_T, BLOCK_N]
        o_ptrs = out_ptr + offs_t[:, None].to(tl.int64) * N + offs_n[None, :]
        o_mask = t_mask[:, None] & n_mask[None, :]
        cur = tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, (cur.to(tl.float32) + scale * delta).to(out_ptr.dtype.element_ty), mask=o_mask)


def default_config(h_in: int, rank_bound: int, block_t: int) -> dict:
    """NOT tuned on a GPU yet (bench/fused_sweep.py does that). Reasoning: a program streams A_m
    then its B chunk serially, so each load should be large (16 x 512 bf16 = 16 KB, two A blocks
    in flight, two programs an SM) and chunks of 2048 columns give a 64-token step 256 (qkv) to
    896 (gate_up) programs."""
    # [BLOCK_T, RB, BLOCK] fp32 products of 8 K values: compiled for sm_90 (bench/kernel_regs.py),
    # RB 16 x 512 at 8 warps takes 99 registers (two programs an SM), x 1024 takes 228
    block = max(64, 8192 // (next_pow2(rank_bound) * block_t))
    return {"chunk": 2048, "block_k": block, "block_n": block, "num_warps": 8}


def lora_decode(x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor, out_offsets: tuple[int, ...],
                seg_indptr: torch.Tensor, seg_slots: torch.Tensor, slot_ranks: torch.Tensor,
                slot_scales: torch.Tensor, out: torch.Tensor, *, block_t: int | None = None,
                rank_bound: int | None = None, config: dict | None = None) -> torch.Tensor:
    """out += LoRA(x) for a decode step in one launch (module docstring). x [T, H_in],
    a_pool [S, M, R, H_in], b_pool [S, R, N], out [T, N] (x's dtype), out_offsets M+1 column
    bounds; every slot of the step must have rank <= rank_bound (the caller's promise)."""
    check_device(x, a_pool, b_pool, seg_indptr, seg_slots, slot_ranks, slot_scales, out)
    num_tokens, h_in = x.shape
    num_slots, num_mods, max_rank, a_h_in = a_pool.shape
    n = out.shape[1]
    offsets = check_out_offsets(out_offsets, num_mods, n)
    if a_h_in != h_in or tuple(b_pool.shape) != (num_slots, max_rank, n) or out.shape[0] != num_tokens:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, a_pool {tuple(a_pool.shape)}, "
                         f"b_pool {tuple(b_pool.shape)}, out {tuple(out.shape)}")
    if block_t not in (1, 2) or rank_bound is None or not 1 <= rank_bound <= min(max_rank, 32):
        raise ValueError(f"block_t must be 1 or 2 and rank_bound in [1, min(R, 32)]: {block_t}, {rank_bound}")
    check_contiguous(x=x, a_pool=a_pool, b_pool=b_pool, out=out, slot_scales=slot_scales)
    num_segs = check_lora_meta(seg_indptr, seg_slots, slot_ranks, num_slots, slot_scales)
    if num_tokens == 0:
        return out
    cfg = {**default_config(h_in, rank_bound, block_t), **(config or {})}
    chunk = cfg["chunk"]
    offs, chs, num_chunks = module_table(offsets, chunk)
    grid = (num_tiles_bound(num_tokens, num_segs, block_t) * num_chunks,)
    _lora_decode_kernel[grid](
        x, a_pool, b_pool, out, seg_indptr, seg_slots, slot_ranks, slot_scales,
        num_tokens, num_segs, h_in, n, num_chunks, *offs, *chs,
        R=max_rank, M=num_mods, RB=next_pow2(rank_bound), CHUNK=chunk,
        BLOCK_G=block_g_for(num_segs), BLOCK_T=block_t, BLOCK_K=cfg["block_k"],
        BLOCK_N=cfg["block_n"], num_warps=cfg["num_warps"])
    return out
