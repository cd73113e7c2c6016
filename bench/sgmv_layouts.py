"""SGMV cost of the engine's decode layouts (issue 7/9 diagnosis): pool max rank R 16 vs 64 for
rank-16 adapters, and segments sorted by adapter vs one segment per token, at 64 tokens
over 1 or 64 adapters; µs per Llama-3-8B layer (all 7 projections, CUDA graph) and per op.

Usage: python bench/sgmv_layouts.py      (CUDA only; prints one line per case)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from kernels.sgmv_expand import sgmv_expand  # noqa: E402
from kernels.sgmv_shrink import sgmv_shrink  # noqa: E402

TOKENS, RANK, SLOTS, SETS = 64, 16, 512, 4


def pools(max_rank: int):
    a = {g: torch.randn(SLOTS, len(w), max_rank, h, device="cuda", dtype=torch.bfloat16) * h ** -0.5
         for g, (h, w) in bk.GROUPS.items()}
    b = {g: torch.randn(SLOTS, max_rank, sum(w), device="cuda", dtype=torch.bfloat16) * 0.25
         for g, (_, w) in bk.GROUPS.items()}
    return a, b


def metadata(adapters: int, layout: str) -> list:
    """SETS disjoint adapter sets: (indptr, slots) sorted by adapter, or one segment per token."""
    perm = torch.randperm(SLOTS)
    sets = []
    for k in range(SETS):
        slots = perm[k * adapters:(k + 1) * adapters]
        if layout == "sorted":
            indptr, segs = torch.arange(0, TOKENS + 1, TOKENS // adapters, dtype=torch.int32), slots
        else:
            indptr, segs = torch.arange(TOKENS + 1, dtype=torch.int32), slots.repeat_interleave(TOKENS // adapters)
        sets.append((indptr.cuda(), segs.to(torch.int32).cuda()))
    return sets


def time_case(a, b, ranks, scales, sets, max_rank) -> dict:
    """µs per layer step of each op (median CUDA-graph replay over the SETS metadata sets)."""
    x = {g: torch.randn(TOKENS, h, device="cuda", dtype=torch.bfloat16) for g, (h, _) in bk.GROUPS.items()}
    y = {g: torch.empty(TOKENS, len(w), max_rank, device="cuda") for g, (_, w) in bk.GROUPS.items()}
    out = {g: torch.randn(TOKENS, sum(w), device="cuda", dtype=torch.bfloat16) for g, (_, w) in bk.GROUPS.items()}

    def shrink(g):
        for ip, sl in sets:
            sgmv_shrink(x[g], a[g], ip, sl, ranks, y[g])

    def expand(g):
        for ip, sl in sets:
            sgmv_expand(y[g], b[g], bk.offsets_of(bk.GROUPS[g][1]), ip, sl, ranks, scales, out[g])

    ops = {}
    for g in bk.GROUPS:
        ops[g + ".shrink"] = bk.median_graph_us(lambda g=g: shrink(g), steps=SETS, reps=20)
        ops[g + ".expand"] = bk.median_graph_us(lambda g=g: expand(g), steps=SETS, reps=20)
    return ops


def main() -> None:
    for max_rank in (16, 64):
        a, b = pools(max_rank)
        ranks = torch.full((SLOTS,), RANK, dtype=torch.int32, device="cuda")
        scales = torch.full((SLOTS,), 2.0, device="cuda")
        for adapters in (1, 64):
            for layout in ("sorted", "per-token"):
                ops = time_case(a, b, ranks, scales, metadata(adapters, layout), max_rank)
                print(f"R{max_rank} adapters {adapters} {layout:9s} layer {sum(ops.values()):6.1f} µs  "
                      + " ".join(f"{k} {v:5.1f}" for k, v in ops.items()), flush=True)


if __name__ == "__main__":
    main()
