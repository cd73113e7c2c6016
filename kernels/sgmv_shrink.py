"""SGMV shrink: the LoRA A product of every token with its segment's adapter slot.

Math (reference: kernels.reference.sgmv_shrink_ref):
    y[t, m, :r] = x[t] @ A[slot(t), m, :r]ᵀ,  y[t, m, r:RB] = 0,  y[t, :, :RB] = 0 for base tokens,
    x [T, H_in], A pool [S, M, R, H_in], y [T, M, R], r = slot_ranks[slot(t)].
RB (config "rank_bound", default R) bounds every slot's rank in the step: the caller's promise.
Rows [RB, R) of y are not written (the expand never reads past a slot's rank), so a pool sized
for rank 64 launches no programs for the padding rows of a step of rank-16 adapters.

Design. Viewing A[slot] as [M*R, H_in] and y as [T, M*R], shrink is a segmented GEMM
over NCOL = M*RB columns (row j < RB of module m is column m*R + j), so fused q/k/v (M=3)
or gate/up (M=2) is one launch.
1-D grid over (token tile, column block, K split), sized from host ints only (T, G,
M*RB, H_in) so it is capturable in a CUDA graph; see kernels/_common.py for how a
program finds its segment. Each program streams its slot's A rows [BLOCK_N, K-range]
once for all BLOCK_T tokens of its tile:
  * column blocks past the slot's rank (padding) are skipped (or only zeroed);
  * BLOCK_T >= 16 uses tl.dot (prefill, long segments), BLOCK_T < 16 a multiply-reduce
    (decode, 1..8 tokens per segment);
  * decode tiles (config "early") read their first A block before the PDL wait: no kernel of a
    step writes the A pool;
  * SPLIT_K > 1 splits H_in over programs and adds partial sums with fp32 atomics into a
    pre-zeroed y (y must be float32): enough programs when T is small, or for prefill.
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
    early_weights,
    launch_options,
    num_tiles_bound,
    pdl_default,
    pdl_start,
    pdl_wait,
    segment_tile,
)
from kernels.tiles import (
    DOT_TILE,
    LONG_H_IN,
    MANY_TOKENS,
    SMALL_RANK,
    cdiv,
    next_pow2,
    pick_block_t,
    prev_pow2,
    shrink_tile,
)

WAVE = 128    # programs of one wave on an H200 (132 SMs), the decode dot tiles' target above SMALL_RANK


# T and G change every prompt step: not specialized on (T % 16, T == 1, ...), so a new
# batch shape does not compile a new variant in the middle of serving (a JIT stall)
@triton.jit(do_not_specialize=["T", "G"])
def _sgmv_shrink_kernel(x_ptr, a_ptr, y_ptr, indptr_ptr, slots_ptr, ranks_ptr,
                        T, G, H_in, NCOL, K_PER_SPLIT,
                        R: tl.constexpr, RB: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, PDL: tl.constexpr,
                        ATOMIC: tl.constexpr, CAN_SKIP: tl.constexpr, IEEE: tl.constexpr, EARLY: tl.constexpr):
    pdl_start(PDL)
    pid = tl.program_id(0)
    num_nb = tl.cdiv(NCOL, BLOCK_N)
    pid_k = pid % SPLIT_K
    pid_n = (pid // SPLIT_K) % num_nb
    pid_tile = pid // (SPLIT_K * num_nb)
    tile_start, tile_end, slot, rank = segment_tile(pid_tile, indptr_ptr, slots_ptr, ranks_ptr, T, G,
                                                    BLOCK_G, BLOCK_T)
    offs_t = tile_start + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)     # over M*RB: module offs_n // RB, row offs_n % RB
    t_mask = offs_t < tile_end
    n_mask = offs_n < NCOL
    col_on = n_mask & ((offs_n % RB) < rank)           # real rank rows of this slot
    cols = (offs_n // RB) * R + offs_n % RB              # the rows' columns in y [T, M*R] and A [M*R, H_in]
    MR = (NCOL // RB) * R                                # y's row length, A's rows per slot
    y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * MR + cols[None, :]
    if CAN_SKIP:
        # the block lies inside one module: all padding when its first rank index >= rank
        active = ((pid_n * BLOCK_N) % RB) < rank
    else:
        active = rank > 0
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, H_in)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * H_in + offs_k[None, :]
    a_base = a_ptr + slot.to(tl.int64) * MR * H_in
    a_ptrs = a_base + cols[:, None].to(tl.int64) * H_in + offs_k[None, :]
    if EARLY:
        # no kernel of a step writes the A pool: the first A block is read before the wait, beside
        # the previous kernel's tail (empty tiles and base tokens have rank 0: nothing is read)
        av_next = tl.load(a_ptrs + k_lo, mask=tl.where(active, col_on, False)[:, None] & ((k_lo + offs_k) < k_hi)[None, :],
                          other=0.0)
    pdl_wait(PDL)                                        # x (and y's zeroing) come from earlier kernels
    if tile_end <= tile_start:
        return
    if not active:
        if not ATOMIC:                                 # atomics: y was zeroed by the launcher
            tl.store(y_ptrs, tl.zeros((BLOCK_T, BLOCK_N), y_ptr.dtype.element_ty),
                     mask=t_mask[:, None] & n_mask[None, :])
        return

    if USE_DOT:
        acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
        # Triton's software pipeliner overlaps these loads with the dots (num_stages)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_mask = (k0 + offs_k) < k_hi
            xv = tl.load(x_ptrs + k0, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            av = tl.load(a_ptrs + k0, mask=col_on[:, None] & k_mask[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xv, tl.trans(av), input_precision="ieee")
            else:
                acc += tl.dot(xv, tl.trans(av))
    else:
        # multiply-accumulate in [BLOCK_T, BLOCK_N, BLOCK_K] and reduce over K once at the end
        # (a reduction per step would cross warps: a barrier each step). The next K block is
        # loaded before this one is used: two loads in flight per program.
        acc3 = tl.zeros((BLOCK_T, BLOCK_N, BLOCK_K), tl.float32)
        k_mask = (k_lo + offs_k) < k_hi
        xv_next = tl.load(x_ptrs + k_lo, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        if not EARLY:
            av_next = tl.load(a_ptrs + k_lo, mask=col_on[:, None] & k_mask[None, :], other=0.0)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            xv = xv_next
            av = av_next
            k_mask = (k0 + BLOCK_K + offs_k) < k_hi
            xv_next = tl.load(x_ptrs + k0 + BLOCK_K, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            av_next = tl.load(a_ptrs + k0 + BLOCK_K, mask=col_on[:, None] & k_mask[None, :], other=0.0)
            acc3 += xv[:, None, :].to(tl.float32) * av[None, :, :].to(tl.float32)
        acc = tl.sum(acc3, axis=2)
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=t_mask[:, None] & col_on[None, :], sem="relaxed")
    else:
        acc = tl.where(col_on[None, :], acc, 0.0)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def _zero_kernel(y_ptr, numel, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """y[:] = 0 before a split-K shrink's atomics (config "zero" = "kernel"): a kernel node, unlike the
    memset node of y.zero_(), keeps the step's PDL chain (a memset node waits for the kernel before it to
    finish and the next kernel for it, each a full launch latency)."""
    pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pdl_wait(PDL)                                        # an earlier kernel may still read y
    tl.store(y_ptr + offs, tl.zeros((BLOCK,), y_ptr.dtype.element_ty), mask=offs < numel)


ZERO_BLOCK = 4096
ZERO_MEMSET_TOKENS = (17, 128)  # decode-sized steps of these many tokens zero y by a memset all the same


def default_config(num_tokens: int, num_segs: int, ncol: int, max_rank: int, h_in: int,
                   atomic_ok: bool, block_t: int | None = None, halve: bool = True) -> dict:
    """Block sizes from host-known shapes (tuned on an H200, see bench/notes/kernels.md);
    block_t given: the other sizes for that token tile; halve False: 4 rows a decode program
    whatever the program count (the rule before the H200 sweep of session 12, for benchmarks)."""
    block_t = block_t or shrink_tile(pick_block_t(num_tokens, num_segs), num_tokens, h_in, max_rank)
    num_stages = 3
    if block_t >= DOT_TILE and max_rank > SMALL_RANK and num_tokens <= MANY_TOKENS:
        # decode steps of ranks past 16 (kernels/tiles.shrink_tile): about one wave of programs (132
        # SMs), wider column blocks as tiles grow, H_in split 4-16 ways. H200 sweep, rank 64, each
        # shrink alone (bench/results/small-sweep-h200.md): the best within ~0.3 µs of 16 x 1, 64 x 1,
        # 64 x 8 and 256 x 1 (the three alternatives at 16 and 256 tokens lose up to 2x). Tiles past 16
        # tokens (long segments): 3 stages and at least 512 of H_in a split (o at 256 x 1: 7.6 -> 7.0 µs
        # with 8 splits of 4096 against 16), each the best of bench/results/small-sweep-s16-h200.md
        tiles = cdiv(num_tokens, block_t)
        block_n = min(16 if tiles <= 2 else 32 if tiles <= 4 else 64, max(16, next_pow2(ncol)))
        split_k = min(16, max(4, prev_pow2(WAVE // (tiles * cdiv(ncol, block_n)))))
        block_k = 128
        if block_t > DOT_TILE:
            split_k = max(1, min(split_k, prev_pow2(h_in // 512)))
            # down's long H_in: K steps of 256, 4 round trips a program in place of 7 (H200, 256 x 1 alone,
            # bench/results/shrink-steps-h200.md: 8.33 -> 7.75 µs; the other shrinks' best kept 128)
            block_k = 256 if h_in > LONG_H_IN else 128
        return _fit({"block_t": block_t, "block_n": block_n, "block_k": block_k, "split_k": split_k, "num_warps": 4,
                     "num_stages": 4 if block_t == DOT_TILE else 3}, atomic_ok)
    if block_t >= 16:
        # long segments: x tiles of up to 64 tokens. Split H_in 4 ways at 4096, 8 at 14336
        # when there are many tiles (prefill), 16 ways when few (a 64-token decode batch of
        # one adapter would otherwise run on a handful of programs)
        block_n, num_warps = min(64, max(16, next_pow2(ncol))), 4
        block_k = 128
        real_tiles = cdiv(num_tokens, block_t) * cdiv(ncol, block_n)
        split_k = max(1, min(8, h_in // 1024)) if real_tiles >= 32 else max(1, min(16, h_in // 256))
        if block_t == DOT_TILE and h_in <= LONG_H_IN:
            # decode steps on dot tiles (256+ tokens, kernels/tiles.shrink_tile): 4 splits, 4 stages, 32+
            # columns. H200 sweep, each shrink alone (bench/results/tile-sweep-dot-h200.md): qkv, o, gate/up
            # at 256 tokens x 64 adapters (76 tiles, which the count above takes for 16) 34.1 -> 30.2 µs;
            # 256 x 16 22.0 -> 22.7 and 256 x 1 21.9 -> 23.1 (their 31 and 17 tiles liked 16 splits), but a
            # decode graph's segment table has one width for all its steps: it cannot tell them apart
            block_n, split_k, num_stages = max(32, block_n), 4, 4
    else:
        # decode: 4 rank rows a program, K blocks of 4096 A elements (8 KB bf16) per step;
        # split only a long H_in (down proj) in two
        block_n = 4
        split_k = cdiv(h_in, 8192)
        blocks = cdiv(num_tokens, block_t) * cdiv(ncol, block_n)
        if block_t == 1 and 256 <= blocks < 600:
            split_k = 1           # enough programs without splitting (H100 sweep: down at 64 x 64)
        halved = halve and block_t <= 2 and blocks < 300
        if halved:
            # about two programs an SM or fewer: 2 rows a program, twice the programs in flight
            # (H200 sweep, bench/results/shrink-sweep-h200.md: o at 64 x 64 4.80 -> 4.41 µs,
            # down 12.20 -> 10.76; 2-token tiles, bench/results/tile-sweep-h200.json: the four
            # shrinks of 16 tokens of one adapter 20.7 -> 18.0 µs, gate/up at 64 x 8 6.38 -> 5.69)
            block_n, blocks = 2, blocks * 2
        # K blocks of 4096 A elements (8 KB bf16); 2048 when programs are many (fewer
        # registers, more resident programs: H200 sweep, qkv at 64 tokens x 64 adapters)
        progs = blocks * split_k
        block_k = (4096 if progs < 600 or block_t > 1 else 2048) // (block_n * block_t)
        # a long H_in (down) in 1-token tiles of few programs: 8 warps. H100 sweep with the early
        # weights (bench/results/early-weights-shrink-sweep-h100.json): down at 64 x 64 16.1 ->
        # 14.6 µs, at 16 x 16 8.5 -> 7.4 µs
        num_warps = 8 if block_t == 1 and h_in > 8192 and progs < 600 and not halved else 4
    return _fit({"block_t": block_t, "block_n": block_n, "block_k": block_k, "split_k": split_k,
                 "num_warps": num_warps, "num_stages": num_stages}, atomic_ok)


def _fit(cfg: dict, atomic_ok: bool) -> dict:
    """No H_in split without fp32 atomics (a y of x's dtype)."""
    return cfg if atomic_ok else {**cfg, "split_k": 1}


def launch_config(num_tokens: int, num_segs: int, num_mods: int, max_rank: int, h_in: int, out_fp32: bool,
                  config: dict | None = None) -> Mapping:
    """Every compile-time choice of a launch, from host ints only: two launches with equal
    dicts (and dtypes) run one compiled variant (inference_worker/lora/warmup.py compiles them
    ahead). `config` overrides block sizes and may give "rank_bound", "block_g" and "halve"
    (default_config).
    Cached (every layer of a step asks the same): the result is read-only."""
    return _launch_config(num_tokens, num_segs, num_mods, max_rank, h_in, out_fp32,
                          tuple(sorted((config or {}).items())))


@functools.lru_cache(maxsize=4096)
def _launch_config(num_tokens: int, num_segs: int, num_mods: int, max_rank: int, h_in: int, out_fp32: bool,
                   config_items: tuple) -> Mapping:
    config = dict(config_items)
    rank_bound = config.get("rank_bound") or max_rank
    if not 1 <= rank_bound <= max_rank:
        raise ValueError(f"rank_bound {rank_bound} must be in [1, R={max_rank}]")
    cfg = default_config(num_tokens, num_segs, num_mods * rank_bound, rank_bound, h_in, out_fp32,
                         config.get("block_t"), config.get("halve", True))
    cfg.update(config)
    cfg["rank_bound"], cfg["block_g"] = rank_bound, block_g_for(num_segs, config.get("block_g"))
    cfg["use_dot"], cfg["atomic"] = cfg["block_t"] >= DOT_TILE, cfg["split_k"] > 1
    cfg.setdefault("pdl", pdl_default(cfg["use_dot"], num_tokens))
    # split-K zeroes y first: by a PDL kernel where the launch asks for PDL, but for steps of 17-128 tokens;
    # else a memset. H200, the layer (bench/results/decode-ab-zero-h200.json): 256 x 16 at rank 64 89.1 ->
    # 84.3 µs, 256 x 64 at rank 8 92.0 -> 86.8, 1 x 1 at rank 16 14.6 -> 13.9; but 64 tokens of one adapter
    # 27.0 -> 29.6 at rank 16 (64 x 8 33.1 -> 32.1: the cause not found), so 64-token steps keep the memset
    kernel_zero = cfg["pdl"] and not ZERO_MEMSET_TOKENS[0] <= num_tokens <= ZERO_MEMSET_TOKENS[1]
    cfg["zero"] = cfg.get("zero", "kernel" if kernel_zero else "memset") if cfg["split_k"] > 1 else None
    if cfg["zero"] not in (None, "kernel", "memset"):
        raise ValueError(f"zero must be 'kernel' or 'memset', got {cfg['zero']!r}")
    cfg["early"] = not cfg["use_dot"] and cfg.get("early", early_weights())
    cfg["can_skip"] = cfg["block_n"] <= rank_bound and rank_bound % cfg["block_n"] == 0
    if cfg["use_dot"] and (cfg["block_n"] < 16 or cfg["block_k"] < 16):
        raise ValueError("tl.dot path (block_t >= 16) needs block_n, block_k >= 16")
    if cfg["atomic"] and not out_fp32:
        raise ValueError("split_k > 1 needs a float32 out (fp32 atomics)")
    return MappingProxyType(cfg)


def sgmv_shrink(x: torch.Tensor, a_pool: torch.Tensor, seg_indptr: torch.Tensor, seg_slots: torch.Tensor,
                slot_ranks: torch.Tensor, out: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """out[t, m, :r] = x[t] @ a_pool[slot(t), m, :r]ᵀ; zeros up to the rank bound (module docstring).

    x [T, H_in] bf16/fp16/fp32, a_pool [S, M, R, H_in] same dtype, out [T, M, R] (fp32
    recommended: it enables split-K; else x's dtype). All contiguous. `config` overrides
    block sizes (benchmarks) and may give "rank_bound" (>= every slot's rank in the step;
    rows past it are not written) and "block_g" (launch_config). No host-device sync; capturable
    in a CUDA graph.
    """
    check_device(x, a_pool, seg_indptr, seg_slots, slot_ranks, out)
    if x.dim() != 2 or a_pool.dim() != 4 or out.dim() != 3:
        raise ValueError(f"need x [T, H_in], a_pool [S, M, R, H_in], out [T, M, R]; got "
                         f"{tuple(x.shape)}, {tuple(a_pool.shape)}, {tuple(out.shape)}")
    num_tokens, h_in = x.shape
    num_slots, num_mods, max_rank, a_h_in = a_pool.shape
    if a_h_in != h_in:
        raise ValueError(f"a_pool H_in {a_h_in} != x H_in {h_in}")
    if tuple(out.shape) != (num_tokens, num_mods, max_rank):
        raise ValueError(f"out must be [T, M, R] = {(num_tokens, num_mods, max_rank)}, got {tuple(out.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or a_pool.dtype != x.dtype:
        raise ValueError(f"x and a_pool must share a float dtype (bf16/fp16/fp32): {x.dtype}, {a_pool.dtype}")
    if out.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"out dtype must be float32 or x's dtype, got {out.dtype}")
    check_contiguous(x=x, a_pool=a_pool, out=out)
    num_segs = check_lora_meta(seg_indptr, seg_slots, slot_ranks, num_slots)
    if num_tokens == 0:
        return out
    cfg = launch_config(num_tokens, num_segs, num_mods, max_rank, h_in, out.dtype == torch.float32, config)
    block_t, block_n, block_k, split_k, rank_bound = (cfg[k] for k in ("block_t", "block_n", "block_k", "split_k",
                                                                        "rank_bound"))
    options = launch_options(x.device, cfg["pdl"])
    if cfg["zero"] == "kernel":
        _zero_kernel[(cdiv(out.numel(), ZERO_BLOCK),)](out, out.numel(), BLOCK=ZERO_BLOCK,
                                                        PDL="launch_pdl" in options, num_warps=4, **options)
    elif cfg["zero"] == "memset":
        out.zero_()
    ncol = num_mods * rank_bound
    k_per_split = cdiv(cdiv(h_in, split_k), block_k) * block_k
    num_tiles = num_tiles_bound(num_tokens, num_segs, block_t)
    grid = (num_tiles * cdiv(ncol, block_n) * split_k,)
    _sgmv_shrink_kernel[grid](
        x, a_pool, out, seg_indptr, seg_slots, slot_ranks,
        num_tokens, num_segs, h_in, ncol, k_per_split,
        R=max_rank, RB=rank_bound, BLOCK_G=cfg["block_g"], BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT_K=split_k, USE_DOT=cfg["use_dot"], ATOMIC=cfg["atomic"], CAN_SKIP=cfg["can_skip"],
        IEEE=(x.dtype == torch.float32), PDL="launch_pdl" in options, EARLY=cfg["early"], num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 3), **options)
    return out
