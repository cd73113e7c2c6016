"""SGMV shrink and expand of one projection in ONE launch (decode steps, CUDA graphs).

Math: sgmv_shrink into y, then sgmv_expand from y into out (kernels/sgmv_shrink.py and
kernels/sgmv_expand.py; references in kernels/reference.py). The programs are exactly theirs.

Why: at decode a layer's LoRA is 8 small launches, and each pays a fixed few µs (launch
node, ramp, tail, the first bytes' latency): 78 µs a layer at 64 tokens x 64 rank-16
adapters against a 43 µs floor (bench/notes/kernels.md). Here the shrink programs and the
expand programs of one projection share a grid: an expand program finds its tile, loads
its out block, then waits (in the kernel) only for the shrink programs of its own token
tile, so the expand's programs fill the SMs while the shrink's last ones finish.

Order without deadlock: a program takes a ticket from a counter (after the previous
kernel's completion, `gdc_wait`) and the ticket, not its program id, says which shrink or
expand program it runs; shrink tickets come first. An expand program only waits for
tickets taken before its own, i.e. by programs already running, and those never wait.
Each shrink program counts itself done for its tile (signal_ready); the last program to
finish zeroes the counters, so a CUDA graph can replay the launch.

`sync`: the caller's int32 buffer of >= 2 + (token tiles) zeros, left zeroed again: one per
call site (a launch must not share it with another launch that may run at the same time).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import sgmv_expand as expand_mod
from kernels import sgmv_shrink as shrink_mod
from kernels._common import (
    check_device,
    interpreting,
    launch_options,
    module_table,
    num_tiles_bound,
    pdl_start,
    pdl_wait,
    signal_ready,
)
from kernels.sgmv_expand import expand_program
from kernels.sgmv_shrink import shrink_program
from kernels.tiles import cdiv

SYNC_HEADER = 2          # sync[0]: tickets taken, sync[1]: programs done, sync[2 + tile]: shrinks done


@triton.jit(do_not_specialize=["T", "G"])
def _sgmv_chain_kernel(x_ptr, a_ptr, y_ptr, b_ptr, out_ptr, indptr_ptr, slots_ptr, ranks_ptr, scales_ptr, sync_ptr,
                       T, G, H_in, NCOL, K_PER_SPLIT, N, MR, NUM_NB,
                       off1, off2, off3, off4, cb1, cb2, cb3,
                       NUM_SHRINK, SHRINK_PER_TILE, NUM_PROGS, SYNC_LEN,
                       R: tl.constexpr, RB: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
                       S_BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       ATOMIC: tl.constexpr, CAN_SKIP: tl.constexpr,
                       E_BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NB_PER_PROG: tl.constexpr,
                       PDL: tl.constexpr, IEEE: tl.constexpr, SLEEP: tl.constexpr):
    pdl_start(PDL)
    # the ticket only after the previous kernel is done: then no earlier launch on this stream
    # still holds this sync buffer
    pdl_wait(PDL)
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    if ticket < NUM_SHRINK:
        shrink_program(ticket, x_ptr, a_ptr, y_ptr, indptr_ptr, slots_ptr, ranks_ptr, T, G, H_in, NCOL,
                       K_PER_SPLIT, R, RB, BLOCK_G, BLOCK_T, S_BLOCK_N, BLOCK_K, SPLIT_K, False, False, ATOMIC,
                       CAN_SKIP, IEEE)
        signal_ready(sync_ptr + 2 + ticket // SHRINK_PER_TILE)
    else:
        expand_program(ticket - NUM_SHRINK, y_ptr, b_ptr, out_ptr, indptr_ptr, slots_ptr, ranks_ptr, scales_ptr,
                       T, G, N, MR, NUM_NB, off1, off2, off3, off4, cb1, cb2, cb3,
                       sync_ptr + 2, SHRINK_PER_TILE, R, BLOCK_G, BLOCK_T, E_BLOCK_N, BLOCK_R, NB_PER_PROG,
                       False, False, IEEE, True, ".cg", SLEEP)
    # the last program out zeroes the counters for the next launch (it follows every other
    # program's last use of them: each counted itself done after it)
    # (relaxed: a program counts itself here after its own waits, so the zeroing follows them)
    if tl.atomic_add(sync_ptr + 1, 1, sem="relaxed") == NUM_PROGS - 1:
        for i in range(0, SYNC_LEN, 1024):
            offs = i + tl.arange(0, 1024)
            tl.store(sync_ptr + offs, tl.zeros((1024,), tl.int32), mask=offs < SYNC_LEN)


def sync_len(num_tokens: int, num_segs: int, block_t: int) -> int:
    """Ints the sync buffer needs for a launch of this shape (token tiles + header)."""
    return SYNC_HEADER + num_tiles_bound(num_tokens, num_segs, block_t)


def sgmv_chain(x: torch.Tensor, a_pool: torch.Tensor, y: torch.Tensor, b_pool: torch.Tensor,
               out_offsets: tuple[int, ...], seg_indptr: torch.Tensor, seg_slots: torch.Tensor,
               slot_ranks: torch.Tensor, slot_scales: torch.Tensor, out: torch.Tensor, sync: torch.Tensor, *,
               config: dict | None = None) -> torch.Tensor:
    """sgmv_shrink(x, a_pool, ..., y) then sgmv_expand(y, b_pool, ..., out) in one launch (module
    docstring); arguments as theirs, plus `sync` (int32 zeros, >= sync_len ints). `config` is the
    step's (block_t, block_g, rank_bound) and may give "shrink" / "expand" block-size overrides and
    "num_warps" (one for both halves; default the larger of theirs).
    Both halves must use one token tile. No host-device sync; capturable in a CUDA graph."""
    check_device(x, a_pool, y, b_pool, seg_indptr, seg_slots, slot_ranks, slot_scales, out, sync)
    config = dict(config or {})
    shrink_cfg = {**config, **config.pop("shrink", {})}
    expand_cfg = {**config, **config.pop("expand", {})}
    num_warps = config.pop("num_warps", None)
    for cfg in (shrink_cfg, expand_cfg):
        for key in ("shrink", "expand", "num_warps"):
            cfg.pop(key, None)
    num_tokens, h_in = x.shape
    num_mods, max_rank = a_pool.shape[1], a_pool.shape[2]
    n = out.shape[1]
    # the launchers' own checks and choices, on the same arguments
    num_segs = shrink_mod.check_args(x, a_pool, seg_indptr, seg_slots, slot_ranks, y)
    expand_mod.check_args(y, b_pool, out_offsets, seg_indptr, seg_slots, slot_ranks, slot_scales, out)
    if sync.dtype != torch.int32 or not sync.is_contiguous():
        raise ValueError(f"sync must be contiguous int32, got {sync.dtype}")
    if num_tokens == 0:
        return out
    s_cfg = shrink_mod.launch_config(num_tokens, num_segs, num_mods, max_rank, h_in, y.dtype == torch.float32,
                                     shrink_cfg)
    e_cfg = expand_mod.launch_config(num_tokens, num_segs, n, max_rank, b_pool.dtype, expand_cfg)
    block_t = s_cfg["block_t"]
    if e_cfg["block_t"] != block_t or e_cfg["use_dot"] or s_cfg["use_dot"]:
        raise ValueError(f"the chained launch serves decode tiles (< 16 tokens) of one size: shrink "
                         f"{block_t}, expand {e_cfg['block_t']}")
    need = sync_len(num_tokens, num_segs, block_t)
    if sync.numel() < need:
        raise ValueError(f"sync holds {sync.numel()} ints, this launch needs {need}")
    if s_cfg["atomic"]:
        y.zero_()
    ncol = num_mods * s_cfg["rank_bound"]
    split_k, s_bn, block_k = s_cfg["split_k"], s_cfg["block_n"], s_cfg["block_k"]
    k_per_split = cdiv(cdiv(h_in, split_k), block_k) * block_k
    tiles = num_tiles_bound(num_tokens, num_segs, block_t)
    shrink_per_tile = cdiv(ncol, s_bn) * split_k
    offs, cbs, num_nb = module_table(tuple(int(o) for o in out_offsets), e_cfg["block_n"])
    num_shrink = tiles * shrink_per_tile
    num_progs = num_shrink + tiles * cdiv(num_nb, e_cfg["nb_per_prog"])
    options = launch_options(x.device)
    _sgmv_chain_kernel[(num_progs,)](
        x, a_pool, y, b_pool, out, seg_indptr, seg_slots, slot_ranks, slot_scales, sync,
        num_tokens, num_segs, h_in, ncol, k_per_split, n, num_mods * max_rank, num_nb,
        *offs, *cbs, num_shrink, shrink_per_tile, num_progs, need,
        R=max_rank, RB=s_cfg["rank_bound"], BLOCK_G=s_cfg["block_g"], BLOCK_T=block_t, S_BLOCK_N=s_bn,
        BLOCK_K=block_k, SPLIT_K=split_k, ATOMIC=s_cfg["atomic"], CAN_SKIP=s_cfg["can_skip"],
        E_BLOCK_N=e_cfg["block_n"], BLOCK_R=e_cfg["block_r"], NB_PER_PROG=e_cfg["nb_per_prog"],
        PDL="launch_pdl" in options, IEEE=(x.dtype == torch.float32), SLEEP=not interpreting(),
        num_warps=num_warps or max(s_cfg["num_warps"], e_cfg["num_warps"]), num_stages=3, **options)
    return out
