"""The loop-free expands of long segments in decode-sized steps (256 tokens of 1-4 adapters: 64-token tiles)
over column blocks a program (config "nb_per_prog", not swept on these tiles before), column widths, warps,
stages and the early first B block (H200).

Why: at 256 tokens of one rank-64 adapter gate/up's expand moves 29 MB of out in ~12 µs (2.5 TB/s), the
largest op of the layer: ~450 programs of one column block each run in about two waves. A program that walks
several column blocks (the next block's loads in flight, config "prefetch") runs in one.

Each op alone, then the layer with each expand's best against the defaults: bench/small_sweep.py's method,
with this grid. Shrinks keep their defaults.

Usage: python bench/expand_blocks.py [--cases 256x1x64,256x4x64] [--jobs 14] --out bench/results/expand-blocks-h200.json
(CUDA only)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.small_sweep import main  # noqa: E402

CASES = ("256x1x64", "256x4x64", "256x1x16", "256x4x16", "256x1x8")


def grids(tokens: int, adapters: int, rank: int) -> tuple[list, list]:
    """(no shrink configs, expand configs): 64-token tiles (128 where segments are that long), all rank rows in
    one step."""
    block_r = 16 if rank <= 16 else 64
    tiles = [bt for bt in (64, 128) if bt <= tokens // adapters]
    expand = [{"block_t": bt, "block_n": bn, "block_r": block_r, "nb_per_prog": nbp, "num_warps": w,
               "num_stages": ns, "prefetch": True, "early_dot": early}
              for bt in tiles for bn in (64, 128, 256) if bt * bn <= 16384 for nbp in (1, 2, 4)
              for w in (4, 8) for ns in (1, 2) for early in (False, True)]
    return [], expand


if __name__ == "__main__":
    main(grids, CASES)
