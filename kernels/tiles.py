"""Token-tile choice of the SGMV kernels, in plain Python (no triton import): the engine's
CUDA-graph code picks a tile per step, and importing triton's JIT there would decorate the
kernels before a test can ask for the interpreter (TRITON_INTERPRET)."""
from __future__ import annotations

import os

FUSED_DECODE_MAX_A_BYTES = 256 << 10    # A_m (rank bound x H_in) one fused program streams first
DOT_TILE = 16        # token tiles this long or longer take tl.dot (prompt steps); shorter ones are decode tiles
MANY_TOKENS = 256    # a step this long fills the GPU with dot tiles of up to 64 tokens
SMALL_SHRINK_TILE = 2  # the shrink's tile where a step is too small for its dot tiles (shrink_tile)
LONG_H_IN = 8192     # a shrink input this wide (down's 14336) has work enough a program for dot tiles from 64 tokens
SMALL_RANK = 16      # rank bounds up to this fit one 16-row tl.dot step; above it a step's shrink keeps dot tiles


# Host-side integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 are JIT
# functions: called from Python each goes through triton's constexpr unwrapping (~1 µs), and an
# SGMV launch made a dozen such calls (40 % of its Python time, measured on CPU).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def prev_pow2(n: int) -> int:
    """The largest power of 2 <= n (1 for n <= 1)."""
    return 1 << max(0, n.bit_length() - 1)


def pick_block_t(num_tokens: int, num_segs: int) -> int:
    """Token tile from the average segment length (host ints only; any real mix stays correct).

    H200 tile sweep (bench/results/tile-sweep-h200.md), each op alone: from 4 tokens a segment the
    tl.dot tiles of 16 win the expand (256 tokens x 64 adapters: the four expands 105 -> 73 µs,
    64 x 8: 31 -> 21 µs); 64-token tiles only where a step has tokens to fill the GPU with them
    (64 tokens of one adapter: 22.1 -> 18.8 µs at 16). The shrink takes its own (shrink_tile)."""
    avg = num_tokens / max(num_segs, 1)
    if avg < 1.5:
        return 1
    if avg < 4:
        return 2
    tile = min(64, max(DOT_TILE, next_pow2(int(avg))))
    return tile if num_tokens >= MANY_TOKENS else min(tile, DOT_TILE)


def shrink_tile(block_t: int, num_tokens: int, h_in: int, rank_bound: int | None = None) -> int:
    """The shrink's token tile in a step tiled block_t, of adapters of ranks <= rank_bound (None: up to
    SMALL_RANK). Its dot tiles need work: at rank 16 and H_in 4096 the few tiles of a small step leave
    most SMs idle, and 2-token decode tiles win. So a dot tile stays for 256 tokens and more, or 64 and
    more with a long H_in (down, 14336), else 2. H200 tile sweep, the four shrinks: 16 tokens of one
    adapter 22.3 -> 18.0 µs, 64 x 8 down 8.70 -> 7.47 µs (kept on 16), 256 x 64 59.0 -> 40.4 µs (qkv,
    gate/up, down on 16 from 2). Above SMALL_RANK a 2-token tile's programs each walk H_in for 4 of
    many rank rows and re-read A once a tile: decode steps (up to 256 tokens) keep their dot tiles (16
    tokens, up to 64 for long segments), whose programs the launcher spreads over H_in
    (bench/results/small-sweep-h200.md: 64 tokens x 8 rank-64 adapters, qkv 19.0 -> 9.0 µs, gate/up 13.1 ->
    6.7; small-sweep-s16-h200.md: 256 x 1, 64-token tiles against 16, the four 35.5 -> 31.0 µs)."""
    if block_t >= DOT_TILE and rank_bound is not None and rank_bound > SMALL_RANK and num_tokens <= MANY_TOKENS:
        return block_t
    if block_t < DOT_TILE or num_tokens >= MANY_TOKENS or (h_in > LONG_H_IN and num_tokens >= 64):
        return block_t
    return SMALL_SHRINK_TILE


def segment_table_width(max_segs: int) -> int:
    """The SGMV segment-table width (BLOCK_G, a power of 2 >= G + 2) that serves every G <= max_segs."""
    return next_pow2(max_segs + 2)


def fused_decode_enabled() -> bool:
    """kernels/lora_decode.py: EXPERIMENTAL, off unless OPENLORA_FUSED_DECODE=1 (slower than shrink +
    expand on the H200: bench/notes/kernels.md, session 4)."""
    return os.environ.get("OPENLORA_FUSED_DECODE", "0") == "1"


def fused_decode_fits(block_t: int | None, rank_bound: int | None, h_in: int, itemsize: int) -> bool:
    """The fused path serves decode tiles (1 or 2 tokens) of small-rank steps with a small A_m."""
    return (block_t in (1, 2) and rank_bound is not None and rank_bound <= 32
            and rank_bound * h_in * itemsize <= FUSED_DECODE_MAX_A_BYTES)
