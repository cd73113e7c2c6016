"""Token-tile choice of the SGMV kernels, in plain Python (no triton import): the engine's
CUDA-graph code picks a tile per step, and importing triton's JIT there would decorate the
kernels before a test can ask for the interpreter (TRITON_INTERPRET)."""
from __future__ import annotations

import os

FUSED_DECODE_MAX_A_BYTES = 256 << 10    # A_m (rank bound x H_in) one fused program streams first
DOT_TILE = 16        # token tiles this long or longer take tl.dot (prompt steps); shorter ones are decode tiles


# Host-side integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 are JIT
# functions: called from Python each goes through triton's constexpr unwrapping (~1 µs), and an
# SGMV launch made a dozen such calls (40 % of its Python time, measured on CPU).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def pick_block_t(num_tokens: int, num_segs: int) -> int:
    """Token tile from the average segment length (host ints only; any real mix stays correct)."""
    avg = num_tokens / max(num_segs, 1)
    if avg < 1.5:
        return 1
    if avg < 12:
        return 2          # H200 sweep: 2-token tiles beat 4 and 8 for 4..8-token segments
    return min(64, max(16, next_pow2(int(avg))))


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
