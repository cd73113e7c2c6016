"""SGMV expand: the LoRA B product, scaled and added in place to the layer output.

Math (reference: kernels.reference.sgmv_expand_ref):
    out[t, off_m:off_m+1] += scale[slot(t)] * y[t, m, :r] @ B[slot(t), :r, off_m:off_m+1]
    y [T, M, R], B pool [S, R, N] with N = out_offsets[-1], out [T, N]; base tokens untouched.

Design. 1-D grid over (token tile, output column block), sized from host ints only
(capturable in a CUDA graph; kernels/_common.py says how a program finds its segment).
Column blocks never straddle two modules: module m owns blocks [cb_m, cb_{m+1}), so
the fused q/k/v or gate/up expand is one launch (M <= 4). B is rank-major: rank row r of
a slot is N contiguous values, so a program reads whole contiguous rows [BLOCK_N] for the
slot's first `rank` rows only, whatever the pool's max rank R (an [S, N, R] pool sized
for rank 64 made a rank-16 adapter read 32 of every 128 bytes). The rank loop stops at
the slot's rank (no work for padding; rows past it are never loaded, so they may hold
anything). BLOCK_T >= 16 uses tl.dot ([BLOCK_T, BLOCK_R] x [BLOCK_R, BLOCK_N], y cast to
B's dtype; with every rank in one BLOCK_R step, config "prefetch", a loop-free block: _expand_dot_prefetched);
smaller tiles (decode) accumulate BLOCK_R unrolled row loads per step in fp32,
each row scaled by its y value; 1-token tiles (config "early") read their first [BLOCK_R, BLOCK_N] block
of B before the PDL wait and sum row blocks in one thread a column (_expand_token), and the loop-free dot
path (config "early_dot") reads its first block's B before the wait too.
Accumulation is fp32; out is read, added to and rounded once.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from kernels._common import (
    block_g_for,
    check_contiguous,
    check_device,
    check_lora_meta,
    check_out_offsets,
    early_weights,
    launch_options,
    module_of,
    module_table,
    num_tiles_bound,
    pdl_default,
    pdl_start,
    pdl_wait,
    segment_tile,
)
from kernels.tiles import DOT_TILE, MANY_TOKENS, SMALL_RANK, cdiv, next_pow2, pick_block_t

EARLY_ALL_ROWS_TOKENS = 16   # 1-token tiles past rank 16 read all their rows early in steps this small
EARLY_DOT_TILES = 32         # the loop-free dot path reads B early by default in steps of this many tiles or fewer


# T and G change every prompt step: not specialized on (T % 16, T == 1, ...), so a new
# batch shape does not compile a new variant in the middle of serving (a JIT stall)
@triton.jit(do_not_specialize=["T", "G"])
def _sgmv_expand_kernel(y_ptr, b_ptr, out_ptr, indptr_ptr, slots_ptr, ranks_ptr, scales_ptr,
                        T, G, N, MR, NUM_NB,
                        off1, off2, off3, off4, cb1, cb2, cb3,
                        R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr, NB_PER_PROG: tl.constexpr,
                        USE_DOT: tl.constexpr, PDL: tl.constexpr, IEEE: tl.constexpr, EARLY: tl.constexpr,
                        PREFETCH: tl.constexpr, EARLY_DOT: tl.constexpr):
    pdl_start(PDL)
    pid = tl.program_id(0)
    num_groups = tl.cdiv(NUM_NB, NB_PER_PROG)
    pid_grp = pid % num_groups
    pid_tile = pid // num_groups
    tile_start, tile_end, slot, rank = segment_tile(pid_tile, indptr_ptr, slots_ptr, ranks_ptr, T, G,
                                                    BLOCK_G, BLOCK_T)
    if EARLY or EARLY_DOT:
        # 1-token tiles and the loop-free dot path: B does not depend on earlier kernels (no kernel of a
        # step writes the pool), so the first column block's first BLOCK_R rows are read before the wait
        # (on the dot path only the bytes move earlier: out and y still cost a round trip after it)
        offs_r = tl.arange(0, BLOCK_R)
        live = (tile_end > tile_start) & (slot >= 0)
        b_slot0 = b_ptr + tl.maximum(slot, 0).to(tl.int64) * R * N
        nb0 = pid_grp * NB_PER_PROG
        m0, lo0, hi0, cb0 = module_of(nb0, cb1, cb2, cb3, off1, off2, off3, off4)
        offs_n0 = lo0 + (nb0 - cb0) * BLOCK_N + tl.arange(0, BLOCK_N)
        b_first = tl.load(b_slot0 + offs_r[:, None] * N + offs_n0[None, :],
                          mask=(offs_r < tl.where(live, rank, 0))[:, None] & (offs_n0 < tl.where(nb0 < NUM_NB, hi0, 0))[None, :],
                          other=0.0)
    pdl_wait(PDL)                                        # y and out come from earlier kernels
    if (tile_end <= tile_start) | (slot < 0):
        return
    if EARLY:
        _expand_token(b_first, y_ptr, b_slot0, out_ptr, scales_ptr, slot, rank, tile_start, pid_grp, N, MR, NUM_NB,
                      off1, off2, off3, off4, cb1, cb2, cb3, R, BLOCK_N, BLOCK_R, NB_PER_PROG)
        return
    scale = tl.load(scales_ptr + slot)
    offs_t = tile_start + tl.arange(0, BLOCK_T)
    t_mask = offs_t < tile_end
    b_slot = b_ptr + slot.to(tl.int64) * R * N
    if PREFETCH:
        if not EARLY_DOT:
            b_first = None
        _expand_dot_prefetched(y_ptr, b_slot, out_ptr, scale, offs_t, t_mask, rank, pid_grp, N, MR, NUM_NB,
                               off1, off2, off3, off4, cb1, cb2, cb3, b_first, R, BLOCK_T, BLOCK_N, BLOCK_R,
                               NB_PER_PROG, IEEE)
        return
    # a program does NB_PER_PROG column blocks of one token tile: the tile lookup above is
    # paid once for several blocks
    for j in range(NB_PER_PROG):
        nb = pid_grp * NB_PER_PROG + j
        m, mod_lo, mod_hi, cb_lo = module_of(nb, cb1, cb2, cb3, off1, off2, off3, off4)
        offs_n = mod_lo + (nb - cb_lo) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < tl.where(nb < NUM_NB, mod_hi, 0)        # blocks past the last: empty
        o_ptrs = out_ptr + offs_t[:, None].to(tl.int64) * N + offs_n[None, :]
        o_mask = t_mask[:, None] & n_mask[None, :]
        cur = tl.load(o_ptrs, mask=o_mask, other=0.0)          # issued first: independent of B
        y_rows = y_ptr + offs_t.to(tl.int64) * MR + m * R       # [BLOCK_T] row starts of module m
        acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            if USE_DOT:
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_mask = offs_r < rank
                yv = tl.load(y_rows[:, None] + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)
                bv = tl.load(b_slot + offs_r[:, None].to(tl.int64) * N + offs_n[None, :],
                             mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(yv.to(bv.dtype), bv, input_precision="ieee")
                else:
                    acc += tl.dot(yv.to(bv.dtype), bv)
            else:
                # unrolled: the BLOCK_R row loads are independent, so they are all in flight at once
                for i in tl.static_range(BLOCK_R):
                    on = (r0 + i) < rank     # (where, not &: the interpreter rejects a scalar & a vector)
                    yv = tl.load(y_rows + r0 + i, mask=tl.where(on, t_mask, False), other=0.0)   # [BLOCK_T]
                    bv = tl.load(b_slot + (r0 + i) * N + offs_n, mask=tl.where(on, n_mask, False),   # R*N < 2^31
                                 other=0.0)
                    acc += yv[:, None].to(tl.float32) * bv[None, :].to(tl.float32)
        tl.store(o_ptrs, (cur.to(tl.float32) + scale * acc).to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _dot_block_loads(nb, live, y_ptr, b_slot, out_ptr, offs_t, t_mask, offs_r, r_mask, N, MR, NUM_NB,
                     off1, off2, off3, off4, cb1, cb2, cb3, b_given, R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column block nb's loads for the tl.dot path (all masked off unless live): out's tile, y's rows of
    the block's module, B's [BLOCK_R, BLOCK_N] rows (b_given instead, when not None: read early);
    with out's pointers and mask for the store."""
    m, mod_lo, mod_hi, cb_lo = module_of(nb, cb1, cb2, cb3, off1, off2, off3, off4)
    offs_n = mod_lo + (nb - cb_lo) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < tl.where(live & (nb < NUM_NB), mod_hi, 0)
    o_ptrs = out_ptr + offs_t[:, None].to(tl.int64) * N + offs_n[None, :]
    o_mask = t_mask[:, None] & n_mask[None, :]
    cur = tl.load(o_ptrs, mask=o_mask, other=0.0)
    yv = tl.load(y_ptr + offs_t[:, None].to(tl.int64) * MR + m * R + offs_r[None, :],
                 mask=t_mask[:, None] & r_mask[None, :], other=0.0)
    if b_given is None:
        bv = tl.load(b_slot + offs_r[:, None].to(tl.int64) * N + offs_n[None, :],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    else:
        bv = b_given
    return cur, yv, bv, o_ptrs, o_mask


@triton.jit
def _expand_dot_prefetched(y_ptr, b_slot, out_ptr, scale, offs_t, t_mask, rank, pid_grp, N, MR, NUM_NB,
                           off1, off2, off3, off4, cb1, cb2, cb3, b_first,
                           R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                           NB_PER_PROG: tl.constexpr, IEEE: tl.constexpr):
    """The tl.dot path of a step whose ranks fit one BLOCK_R step (config "prefetch"): a column block is
    then one set of loads and one dot, with no rank loop, and with several blocks a program block j+1's
    loads are issued before block j's dot and store. On the H200 most of the win is the loop-free block
    itself (one block a program): Triton's pipeliner staged the one-step rank loop's loads through shared
    memory, and these latency-bound programs (Nsight Compute: bench/results/ncu-layer-h200.md) paid for it."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    nb = pid_grp * NB_PER_PROG
    cur, yv, bv, o_ptrs, o_mask = _dot_block_loads(nb, True, y_ptr, b_slot, out_ptr, offs_t, t_mask, offs_r,
                                                   r_mask, N, MR, NUM_NB, off1, off2, off3, off4, cb1, cb2, cb3,
                                                   b_first, R, BLOCK_N)
    for j in range(NB_PER_PROG):
        cur_n, yv_n, bv_n, o_ptrs_n, o_mask_n = _dot_block_loads(
            nb + 1, j + 1 < NB_PER_PROG, y_ptr, b_slot, out_ptr, offs_t, t_mask, offs_r, r_mask, N, MR, NUM_NB,
            off1, off2, off3, off4, cb1, cb2, cb3, None, R, BLOCK_N)
        if IEEE:
            acc = tl.dot(yv.to(bv.dtype), bv, input_precision="ieee")
        else:
            acc = tl.dot(yv.to(bv.dtype), bv)
        tl.store(o_ptrs, (cur.to(tl.float32) + scale * acc).to(out_ptr.dtype.element_ty), mask=o_mask)
        cur, yv, bv, o_ptrs, o_mask = cur_n, yv_n, bv_n, o_ptrs_n, o_mask_n
        nb += 1


@triton.jit
def _expand_token(b_first, y_ptr, b_slot, out_ptr, scales_ptr, slot, rank, t, pid_grp, N, MR, NUM_NB,
                  off1, off2, off3, off4, cb1, cb2, cb3,
                  R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NB_PER_PROG: tl.constexpr):
    """The expand of one token (a 1-token tile): NB_PER_PROG column blocks, each read as [BLOCK_R,
    BLOCK_N] row blocks summed over ranks in fp32; b_first is block 0's first BLOCK_R rows."""
    scale = tl.load(scales_ptr + slot)
    offs_r = tl.arange(0, BLOCK_R)
    for j in tl.static_range(NB_PER_PROG):
        nb = pid_grp * NB_PER_PROG + j
        m, mod_lo, mod_hi, cb_lo = module_of(nb, cb1, cb2, cb3, off1, off2, off3, off4)
        offs_n = mod_lo + (nb - cb_lo) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < tl.where(nb < NUM_NB, mod_hi, 0)        # blocks past the last: empty
        o_ptrs = out_ptr + t.to(tl.int64) * N + offs_n
        cur = tl.load(o_ptrs, mask=n_mask, other=0.0)
        y_row = y_ptr + t.to(tl.int64) * MR + m * R
        if j == 0:
            bv = b_first
        else:
            bv = tl.load(b_slot + offs_r[:, None] * N + offs_n[None, :],
                         mask=(offs_r < rank)[:, None] & n_mask[None, :], other=0.0)
        yv = tl.load(y_row + offs_r, mask=offs_r < rank, other=0.0)
        acc = tl.sum(yv[:, None].to(tl.float32) * bv.to(tl.float32), axis=0)
        for r0 in range(BLOCK_R, rank, BLOCK_R):
            rows = r0 + offs_r
            bv = tl.load(b_slot + rows[:, None] * N + offs_n[None, :], mask=(rows < rank)[:, None] & n_mask[None, :],
                         other=0.0)
            yv = tl.load(y_row + rows, mask=rows < rank, other=0.0)
            acc += tl.sum(yv[:, None].to(tl.float32) * bv.to(tl.float32), axis=0)
        tl.store(o_ptrs, (cur.to(tl.float32) + scale * acc).to(out_ptr.dtype.element_ty), mask=n_mask)


def default_config(num_tokens: int, num_segs: int, n: int, max_rank: int, block_t: int | None = None,
                   early: bool = False) -> dict:
    """Block sizes from host-known shapes (tuned on an H200 with the rank-major B pool, see
    bench/notes/kernels.md); block_t given: the other sizes for that token tile; early: for the
    1-token path that reads its first B rows before the PDL wait (_expand_token)."""
    block_t = block_t or pick_block_t(num_tokens, num_segs)
    rank_p2 = next_pow2(max_rank)
    num_stages = 3
    if early:
        # a program sums [BLOCK_R, 512] row blocks over their rows: 2 warps hold a column's rows in
        # one thread (8 columns a thread, 16-byte loads; more warps spread the rows over warps and
        # the sum crosses them: 4x slower). 8-row steps, one block a program. H100 sweep at 64 x 64
        # and 16 x 16, rank 16 (bench/early_weights.py --sweep): the four expands (each alone, summed)
        # 52.1 -> 40.3 µs and 24.1 -> 15.7 µs (the best config per op: 38.5 and 15.3)
        # Past rank 16, 16-row steps; in steps of up to 16 tokens all rows (up to 64) read early, 128 columns a
        # program: no rank loop after the wait. H200, rank 64: 1 token, the four expands alone 14.9 -> 10.2 µs
        # (bench/results/small-sweep-s16-h200.md); the layer (bench/results/decode-ab-s16-first-h200.json) 1 x 1
        # 27.1 -> 18.0 µs, 16 x 16 63.1 -> 56.7, but 64 x 64 199 -> 211 and 256 x 256 702 -> 747 (4x the
        # programs, each with its segment lookup)
        if rank_p2 > SMALL_RANK and num_tokens <= EARLY_ALL_ROWS_TOKENS:
            return {"block_t": 1, "block_n": 128, "block_r": min(64, rank_p2), "nb_per_prog": 1, "num_warps": 2,
                    "num_stages": num_stages}
        # Rank 16 in one 16-row step where the output is up to 8192 wide (qkv, o, down): one round trip fewer.
        # H200, 64 x 64, each expand alone (bench/results/small-sweep-64x64-h200.md): qkv 5.86 -> 5.29 µs, down
        # 4.64 -> 4.07, o even; gate/up's 28672 columns lost (17.4 -> 19.5: twice the registers a program)
        rows = 16 if rank_p2 > SMALL_RANK or n <= 8192 else 8
        return {"block_t": 1, "block_n": 512, "block_r": min(rows, rank_p2),
                "nb_per_prog": 1, "num_warps": 2, "num_stages": num_stages}
    if block_t == DOT_TILE and rank_p2 <= 16:
        # decode steps of 4+ tokens a segment (kernels/tiles.pick_block_t), ranks in one 16-row step: a
        # column block is one set of loads and one dot, with no rank loop for the pipeliner to stage
        # (config "prefetch"). H200 sweep, each expand alone (bench/results/tile-sweep-dot-h200.md), the
        # four: 256 tokens x 64 adapters 72.9 -> 61.8 µs (gate/up 44.4 -> 36.2), 64 x 16 28.7 -> 24.8,
        # 256 x 1 29.4 -> 24.7. 4-8 blocks a program won a further 5.6 µs at 256 x 64 but lost 6 at 64 x 8;
        # a decode graph's segment table has one width for all its steps, so it cannot tell them apart.
        return {"block_t": block_t, "block_n": 256, "block_r": 16, "nb_per_prog": 1, "num_warps": 4,
                "num_stages": 2, "prefetch": True}
    if block_t == DOT_TILE and rank_p2 <= 64:
        # ranks past 16 on 16-token tiles: the loop-free path with all 64 rows in one step. H200 sweep,
        # rank 64, each expand alone (bench/results/small-sweep-h200.md): 64 tokens x 8 adapters, gate/up
        # 14.8 -> 12.2 µs (13.2 without PDL), 16-row steps 13.2 (with PDL)
        return {"block_t": block_t, "block_n": 256, "block_r": 64, "nb_per_prog": 1, "num_warps": 4,
                "num_stages": 2, "prefetch": True}
    if block_t > DOT_TILE and num_tokens <= MANY_TOKENS and rank_p2 <= 64:
        # long segments in a decode-sized step (256 tokens of one adapter: 64-token tiles): loop-free too, on
        # 128 columns (256 for gate/up's 28672). Each token tile re-reads its columns' B, so wide tiles read it
        # less. H200 sweep, 256 x 1 at rank 64, each expand alone (bench/results/small-sweep-s16-h200.md): the
        # four 37.5 -> 24.6 µs (gate/up 18.4 -> 11.9) against 16-row steps on 128-256 columns
        return {"block_t": block_t, "block_n": 256 if n > 8192 else 128, "block_r": 16 if rank_p2 <= 16 else 64,
                "nb_per_prog": 1, "num_warps": 4, "num_stages": 2, "prefetch": True}
    if block_t >= 16:
        # BLOCK_R = 32 on the tl.dot path faulted ("misaligned address") with triton 3.6 on the
        # H200 (bf16/fp16 B, R = 32: tests/kernels/test_tiny_shapes_gpu.py). 16 also in rank-64
        # pools: a slot's rank loop then stops within 15 rows of its rank (64 made rank-8 adapters
        # multiply 56 rows of zeros): H200, a mixed step of 1,842 tokens over ranks 8..64, the
        # layer's LoRA 565 -> 414 µs (bench/lora_mixed_step.py; bench/notes/kernels.md, session 5); a
        # prefill of rank-64 adapters only pays 8 % (2048 x 8 expands 199 -> 216 µs).
        # 2048 x 8 sweep: 256 columns and 2 stages beat 128 and 3 by ~15 % (not for gate_up)
        block_r = 16
        block_n = 256 if n <= 8192 else 128
        num_stages, num_warps = 2, 4
    elif block_t == 2:
        block_r, block_n, num_warps = min(16, rank_p2), 512, 4      # 64 x 8 sweep: 5.6 vs 7.4 µs (qkv)
    elif rank_p2 > 16:
        # ranks above 16 in the step (issue 9's S1000: ranks 8..64 in a rank-64 pool): programs do
        # up to 4x the rows, so narrower blocks (more programs) win, with 8-row steps (a rank-8
        # slot wastes none). H200 sweep, 64 tokens x 46 adapters: the layer's expands 118 -> 88 µs
        # (gate_up 65.5 -> 49.2); bench/notes/kernels.md, session 5
        return {"block_t": block_t, "block_n": 256, "block_r": 8, "nb_per_prog": 1, "num_warps": 8,
                "num_stages": 3}
    else:
        # ~1500 column-block programs: 256 columns (qkv/o/down at 64 tokens) with 8 warps, up to
        # 1024 for gate_up's 28672 columns (26 vs 31 µs at 64 x 64), where 8-row steps keep
        # registers low
        tiles = cdiv(num_tokens, block_t)
        block_n = max(256, min(1024, 1 << max(0, (n * tiles // 1536).bit_length() - 1)))
        block_r = min(16 if block_n <= 512 else 8, rank_p2)
        num_warps = 8 if block_n <= 256 else 4
    # two column blocks a program (the tile lookup paid once) while >= ~1024 programs remain
    blocks = cdiv(num_tokens, block_t) * cdiv(n, block_n)
    nb_per_prog = 2 if blocks >= 1024 else 1
    # prompt tiles of up to 32 tokens (the engine's prompt graphs), ranks in one 16-row step: the loop-free
    # path with the next block's loads in flight. H200, 2048 tokens x 8 adapters, 32-token tiles, each
    # expand alone (bench/results/dot-ab-h200.json): qkv 19.4 -> 16.7 µs, o and down 14.3 -> 12.1 and
    # 14.7 -> 12.4, gate/up 97.2 -> 81.9. (64-token tiles already use 254 registers: not tried.)
    prefetch = DOT_TILE <= block_t <= 32 and rank_p2 <= 16
    return {"block_t": block_t, "block_n": block_n, "block_r": block_r, "nb_per_prog": nb_per_prog,
            "num_warps": num_warps, "num_stages": num_stages, "prefetch": prefetch}


def early_dot_tiles(num_tokens: int, num_segs: int, block_t: int) -> bool:
    """Whether a step has few enough token tiles for the dot path's early B reads (launch_config)."""
    return num_tiles_bound(num_tokens, num_segs, block_t) <= EARLY_DOT_TILES


def launch_config(num_tokens: int, num_segs: int, n: int, max_rank: int, b_dtype: torch.dtype,
                  config: dict | None = None) -> Mapping:
    """Every compile-time choice of a launch, from host ints only (see sgmv_shrink.launch_config);
    `config` overrides block sizes and may give "block_g" and "rank_bound" (>= every slot's rank in
    the step; the block sizes are picked for it, default R).
    Cached (every layer of a step asks the same): the result is read-only."""
    return _launch_config(num_tokens, num_segs, n, max_rank, b_dtype, tuple(sorted((config or {}).items())))


@functools.lru_cache(maxsize=4096)
def _launch_config(num_tokens: int, num_segs: int, n: int, max_rank: int, b_dtype: torch.dtype,
                   config_items: tuple) -> Mapping:
    config = dict(config_items)
    rank_bound = config.pop("rank_bound", None) or max_rank
    if not 1 <= rank_bound <= max_rank:
        raise ValueError(f"rank_bound {rank_bound} must be in [1, R={max_rank}]")
    block_t = config.get("block_t") or pick_block_t(num_tokens, num_segs)
    # 1-token tiles read their first B rows early (kernels/_common.early_weights)
    early = block_t == 1 and bool(config.get("early", early_weights()))
    cfg = {"nb_per_prog": 1, **default_config(num_tokens, num_segs, n, rank_bound, block_t, early), **config}
    cfg["block_g"], cfg["use_dot"], cfg["early"] = block_g_for(num_segs, config.get("block_g")), block_t >= DOT_TILE, early
    cfg.setdefault("pdl", pdl_default(cfg["use_dot"], num_tokens))
    if cfg["use_dot"] and (cfg["block_n"] < 16 or cfg["block_r"] < 16):
        raise ValueError("tl.dot path (block_t >= 16) needs block_n, block_r >= 16")
    one_step = cfg["use_dot"] and rank_bound <= cfg["block_r"]
    if config.get("prefetch") and not one_step:
        raise ValueError(f"prefetch needs the tl.dot path and rank_bound {rank_bound} <= block_r {cfg['block_r']}")
    cfg["prefetch"] = bool(cfg.get("prefetch")) and one_step     # a default's, off where overrides rule it out
    # the loop-free path reads its first block's B before the PDL wait (config "early_dot"), by default where
    # the launch asks for PDL (decode-sized steps) and has few token tiles; early_weights turns it off with
    # the 1-token path's. H200, the layer (bench/results/decode-ab-s16-first-h200.json): 64 x 8 at rank 16 36.0 ->
    # 33.5 µs, 256 x 16 56.2 -> 54.7 (31 tiles); but 256 x 64 (76 tiles, programs in several waves, whose
    # early reads hold registers and overlap nothing) 105.0 -> 106.7
    early_dot = cfg["pdl"] and early_dot_tiles(num_tokens, num_segs, block_t)
    cfg["early_dot"] = cfg["prefetch"] and bool(cfg.get("early_dot", early_dot)) and early_weights()
    if cfg["use_dot"] and cfg["block_r"] == 32 and b_dtype != torch.float32:
        # faults with "misaligned address" (triton 3.6, H200): see default_config
        raise ValueError("tl.dot path with bf16/fp16 B does not support block_r = 32; use 16 or 64")
    return MappingProxyType(cfg)


def sgmv_expand(y: torch.Tensor, b_pool: torch.Tensor, out_offsets: tuple[int, ...], seg_indptr: torch.Tensor,
                seg_slots: torch.Tensor, slot_ranks: torch.Tensor, slot_scales: torch.Tensor,
                out: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """out[t, off_m:off_m+1] += scale * y[t, m, :r] @ b_pool[slot, :r, off_m:off_m+1] (module docstring).

    y [T, M, R] fp32 or B's dtype, b_pool [S, R, N] bf16/fp16/fp32, out [T, N] B's dtype,
    out_offsets a tuple of M+1 ints (M <= 4) from 0 to N. All contiguous. `config` overrides
    block sizes and may give "block_g" (launch_config). No host-device sync; capturable in a CUDA graph.
    """
    check_device(y, b_pool, seg_indptr, seg_slots, slot_ranks, slot_scales, out)
    if y.dim() != 3 or b_pool.dim() != 3 or out.dim() != 2:
        raise ValueError(f"need y [T, M, R], b_pool [S, R, N], out [T, N]; got "
                         f"{tuple(y.shape)}, {tuple(b_pool.shape)}, {tuple(out.shape)}")
    num_tokens, num_mods, max_rank = y.shape
    num_slots, b_rank, n = b_pool.shape
    offsets = check_out_offsets(out_offsets, num_mods, n)
    if b_rank != max_rank:
        raise ValueError(f"b_pool rank {b_rank} != y rank {max_rank}")
    if tuple(out.shape) != (num_tokens, n):
        raise ValueError(f"out must be [T, N] = {(num_tokens, n)}, got {tuple(out.shape)}")
    if b_pool.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"b_pool must be bf16/fp16/fp32, got {b_pool.dtype}")
    if y.dtype not in (torch.float32, b_pool.dtype) or out.dtype != b_pool.dtype:
        raise ValueError(f"y must be float32 or B's dtype and out B's dtype: y {y.dtype}, "
                         f"b_pool {b_pool.dtype}, out {out.dtype}")
    check_contiguous(y=y, b_pool=b_pool, out=out, slot_scales=slot_scales)
    num_segs = check_lora_meta(seg_indptr, seg_slots, slot_ranks, num_slots, slot_scales)
    if num_tokens == 0:
        return out
    cfg = launch_config(num_tokens, num_segs, n, max_rank, b_pool.dtype, config)
    block_t, block_n, block_r, nb_per_prog = cfg["block_t"], cfg["block_n"], cfg["block_r"], cfg["nb_per_prog"]
    offs, cbs, num_nb = module_table(offsets, block_n)
    num_tiles = num_tiles_bound(num_tokens, num_segs, block_t)
    grid = (num_tiles * cdiv(num_nb, nb_per_prog),)
    options = launch_options(y.device, cfg["pdl"])
    _sgmv_expand_kernel[grid](
        y, b_pool, out, seg_indptr, seg_slots, slot_ranks, slot_scales,
        num_tokens, num_segs, n, num_mods * max_rank, num_nb,
        *offs, *cbs,
        R=max_rank, BLOCK_G=cfg["block_g"], BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_R=block_r, NB_PER_PROG=nb_per_prog, USE_DOT=cfg["use_dot"], PDL="launch_pdl" in options,
        IEEE=(b_pool.dtype == torch.float32), EARLY=cfg["early"], PREFETCH=cfg["prefetch"], EARLY_DOT=cfg["early_dot"],
        num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3), **options)
    return out
