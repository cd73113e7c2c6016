"""The dot-tile shrinks of decode steps over what earlier sweeps held fixed: K steps of 128 to 512 of H_in,
2-4 pipeline stages and 4 or 8 warps, beside token tiles, column blocks and H_in splits (H200).

Why: a shrink of 256 tokens of one rank-64 adapter moves ~3.5 MB (qkv) yet takes ~5 µs: its ~120 programs
each walk 8 K steps of 128 with 3 loads in flight, so the time is round trips, not bytes. Longer K steps
halve the round trips at the cost of shared memory (fewer stages fit). Split-K without atomics did not pay
(bench/results/split-reduce-h200.json, bench/notes/kernels.md session 18).

Each op alone, then the layer with each shrink's best against the defaults: bench/small_sweep.py's method
(its case, compile-ahead and markdown), with this grid. Expands keep their defaults.

Usage: python bench/shrink_steps.py [--cases 256x1x64,64x1x64] [--jobs 14] --out bench/results/shrink-steps-h200.json
(CUDA only)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.small_sweep import main  # noqa: E402

CASES = ("256x1x64", "64x1x64", "256x16x64", "64x8x64", "16x1x64", "256x1x16", "256x16x16", "256x1x8")


def grids(tokens: int, adapters: int, rank: int) -> tuple[list, list]:
    """(shrink configs, no expand configs): 16-token tiles, and 64-token ones where segments are that long."""
    tiles = [bt for bt in (16, 64) if bt <= max(16, tokens // adapters)]
    shrink = [{"block_t": bt, "block_n": bn, "block_k": bk, "split_k": sk, "num_warps": w, "num_stages": ns}
              for bt in tiles for bn in (32, 64) for bk in (128, 256, 512) for sk in (4, 8, 16)
              for w in (4, 8) for ns in (2, 3, 4) if (bt + bn) * bk * 2 * ns <= 200 << 10]
    return shrink, []


if __name__ == "__main__":
    main(grids, CASES)
