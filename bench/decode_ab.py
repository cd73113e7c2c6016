"""Session 15's decode rules against the rules before them, at the layer, over every decode case of
bench/kernels.py's table (issue 7).

What changed (bench/results/small-sweep-h200.md has the per-op sweep behind each):
  * tl.dot tiles of decode-sized steps (up to 256 tokens) launch with PDL, as decode tiles did
    (kernels/_common.pdl_default);
  * ranks past 16 (the step's rank bound): the shrink keeps 16-token dot tiles in decode steps, about one
    wave of programs (kernels/tiles.shrink_tile, sgmv_shrink.default_config); the expand on 16-token
    tiles takes all 64 rows in one loop-free step, and on 1-token tiles reads B early in 16-row steps
    (sgmv_expand.default_config).
Per case, interleaved (bench.kernels.interleaved_medians): one Llama-3-8B layer's LoRA (8 launches) under
"before" (the old rules as explicit configs), "now" (the defaults) and, for rank-64 steps on 1-token
tiles, "now_late" (the defaults without the early B reads); the pool's rank is the adapters'. For rank 64,
also lora_silu_mul (gate/up in the activation, the engine's decode graphs at tile 16) with 16-row
steps against one 64-row step.

Usage: python bench/decode_ab.py [--ranks 16,64,8] [--cases 64x8,256x64] --out bench/results/decode-ab-h200.json
(CUDA only)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from bench.dot_ab import silu  # noqa: E402
from kernels.sgmv_shrink import default_config as shrink_defaults  # noqa: E402
from kernels.tiles import DOT_TILE, SMALL_RANK, cdiv, next_pow2, pick_block_t, shrink_tile  # noqa: E402

CASES = ((1, 1), (16, 1), (16, 16), (64, 1), (64, 8), (64, 64), (256, 1), (256, 16), (256, 64), (256, 256))
REPS = 200


def before(tokens: int, adapters: int, rank: int) -> tuple[dict, dict]:
    """(shrink configs, expand configs) per group under the rules before session 15, where they differ from
    today's defaults (bench/results/kernels-h200-run14.md ran them)."""
    block_t = pick_block_t(tokens, adapters)
    shrink, expand = {}, {}
    for g, (h_in, widths) in bk.GROUPS.items():
        n = sum(widths)
        if block_t == 1 and rank > 16:
            expand[g] = {"early": False}
        elif block_t >= DOT_TILE:
            expand[g] = {"pdl": False}
            if block_t == DOT_TILE and 16 < next_pow2(rank) <= 64:
                bn = 256 if n <= 8192 else 128
                nb = 2 if cdiv(tokens, DOT_TILE) * cdiv(n, bn) >= 1024 else 1
                expand[g] = {"block_t": DOT_TILE, "block_n": bn, "block_r": 16, "nb_per_prog": nb, "num_warps": 4,
                             "num_stages": 2, "prefetch": False, "pdl": False}
            tile = shrink_tile(block_t, tokens, h_in)       # (no rank bound: the rank-16 rule, as before)
            if tile < DOT_TILE:
                if rank > 16:                    # today a dot tile; before, 2-token tiles as set then
                    shrink[g] = {"block_t": tile}
            elif rank > 16:
                # the rank-16 rules' blocks for these columns (the one-wave rule is for rank bounds past 16)
                shrink[g] = {**shrink_defaults(tokens, adapters, len(widths) * rank, SMALL_RANK, h_in, True, tile),
                             "pdl": False}
            else:
                shrink[g] = {"pdl": False}
    return shrink, expand


def case(pools: bk.Pools, tokens: int, adapters: int) -> dict:
    sets = bk.make_sets(tokens, adapters, bk.K_STEPS)
    layer = bk.Layer(tokens, pools.rank)
    variants = {"before": before(tokens, adapters, pools.rank), "now": ({}, {})}
    if pools.rank > 16 and pick_block_t(tokens, adapters) == 1:
        variants["now_late"] = ({}, {g: {"early": False} for g in bk.GROUPS})
    graphs = {name: bk.capture_graph(lambda s=s, e=e: [bk.ours_step(pools, layer, m, s, e) for m in sets])
              for name, (s, e) in variants.items()}
    if pools.rank > 16 and pick_block_t(tokens, adapters) == DOT_TILE:
        for block_r in (16, 64):
            fn = silu(pools, layer, {"block_t": DOT_TILE, "block_r": block_r})
            graphs[f"silu.block_r{block_r}"] = bk.capture_graph(lambda fn=fn: [fn(m) for m in sets])
    return bk.interleaved_medians(graphs, REPS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="16,64,8")
    ap.add_argument("--cases", default=",".join(f"{t}x{a}" for t, a in CASES))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    report = bk.start_report(cases={})
    for rank in (int(r) for r in args.ranks.split(",")):
        pools = bk.Pools(rank)
        for c in args.cases.split(","):
            tokens, adapters = (int(n) for n in c.split("x"))
            row = case(pools, tokens, adapters)
            report["cases"][f"{c}x{rank}"] = row
            print(f"{c}x{rank}", " ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
        del pools


if __name__ == "__main__":
    main()
