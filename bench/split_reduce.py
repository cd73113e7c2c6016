"""Split-K shrinks of decode steps: fp32 atomics into a zeroed y (the kernels' rule so far) against the last
program of each (tile, column block) group adding the others' partial sums (config "reduce" = "count": no
zeroing node, no atomics on y, kernels/sgmv_shrink._sum_splits). H200.

Why: in steps of few adapters and long segments (256 tokens of one rank-64 adapter) the shrinks take most of
the layer's LoRA time, and their best configs split H_in only 4 ways: more splits mean more programs in flight
but also more atomics on the same y. Counting removes the atomics, so more splits may pay.

Per case (tokens x adapters x rank): each group's shrink alone over token tiles, column blocks and splits,
both ways (bench/tile_sweep.time_configs: every config checked against the default's result first), then
the layer's 8 launches (expands at their defaults) under the default shrinks, each shrink's best atomic config
and each shrink's best counted one, interleaved (bench.kernels.interleaved_medians).

Usage: python bench/split_reduce.py [--cases 256x1x64,64x8x64] [--jobs 12] --out bench/results/split-reduce-h200.json
(CUDA only)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from bench.small_sweep import REPS, WARM_SLOTS, parse_case  # noqa: E402
from bench.tile_sweep import BLOCK_G, sweep_inputs, time_configs  # noqa: E402

CASES = ("256x1x64", "256x16x64", "64x8x64", "64x1x64", "16x1x64", "256x1x16", "256x16x16", "256x64x16",
         "256x64x8", "1x1x16", "64x64x16")
REDUCE = ("atomic", "count")


def shrink_grid(tokens: int, adapters: int, rank: int) -> list[dict]:
    """Dot tiles up to a segment's length (16 at least), 32 or 64 columns, 2-32 splits; 1-token tiles (one
    token a segment): 2 or 4 rank rows, 2-8 splits. Each both ways."""
    per_seg = tokens // adapters
    if per_seg == 1:
        return [{"block_t": 1, "block_n": bn, "block_k": 4096 // bn, "split_k": sk, "num_warps": 4, "reduce": red}
                for bn in (2, 4) for sk in (2, 4, 8) for red in REDUCE]
    tiles = [bt for bt in (16, 64, 128) if bt <= max(16, per_seg)]
    return [{"block_t": bt, "block_n": bn, "block_k": 128, "split_k": sk, "num_warps": 4,
             "num_stages": 4 if bt == 16 else 3, "reduce": red}
            for bt in tiles for bn in (32, 64) for sk in (2, 4, 8, 16, 32) for red in REDUCE]


def _warm(job: int, jobs: int, cases: list[str]) -> None:
    """Compile-ahead worker: launches every `jobs`-th (case, group, config) once, errors ignored (the timing
    pass reports them)."""
    torch.cuda.set_device(0)
    pools, n = {}, 0
    for c in cases:
        tokens, adapters, rank = parse_case(c)
        pools.setdefault(rank, bk.Pools(rank, WARM_SLOTS))
        layer = bk.Layer(tokens, rank)
        meta = bk.make_sets(tokens, adapters, 1, WARM_SLOTS)[0]
        for g, (_, widths) in bk.GROUPS.items():
            for cfg in shrink_grid(tokens, adapters, rank):
                n += 1
                if n % jobs == job:
                    try:
                        bk._one_op("shrink", g, widths, layer, pools[rank], {"block_g": BLOCK_G, **cfg})(meta)
                    except Exception:  # noqa: BLE001, S110 - reported by the timing pass
                        pass
    torch.cuda.synchronize()


def case(pools: bk.Pools, tokens: int, adapters: int, log: list) -> dict:
    sets, layer, refs = sweep_inputs(pools, tokens, adapters)
    ops, best = {}, {red: {} for red in REDUCE}
    for g in bk.GROUPS:
        results = time_configs("shrink", g, layer, refs, pools, sets, shrink_grid(tokens, adapters, pools.rank), log)
        row = {"default_us": results[0][0], "all": results}
        for red in REDUCE:
            us, cfg = min((r for r in results[1:] if r[1]["reduce"] == red), key=lambda r: r[0])
            row[red] = {"us": us, "cfg": cfg}
            if us < results[0][0]:
                best[red][g] = cfg
        ops[g] = row
        print(f"{tokens}x{adapters}x{pools.rank} {g:8s} default {results[0][0]:6.2f} "
              + " ".join(f"{red} {row[red]['us']:6.2f} {row[red]['cfg']}" for red in REDUCE), flush=True)
    variants = {"default": {}, **best}
    graphs = {name: bk.capture_graph(lambda s=s: [bk.ours_step(pools, layer, m, s) for m in sets])
              for name, s in variants.items()}
    layer_us = bk.interleaved_medians(graphs, REPS)
    print(f"{tokens}x{adapters}x{pools.rank} layer " + " ".join(f"{k} {v:.2f}" for k, v in layer_us.items()), flush=True)
    return {"ops": ops, "layer_us": layer_us, "best": best}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--jobs", type=int, default=12, help="compile-ahead processes (0: none)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cases = args.cases.split(",")
    log: list = []
    report = bk.start_report(block_g=BLOCK_G, cases={}, log=log)
    if args.jobs:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_warm, args=(j, args.jobs, cases)) for j in range(args.jobs)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    pools = {}
    for c in cases:
        tokens, adapters, rank = parse_case(c)
        pools.setdefault(rank, bk.Pools(rank))
        report["cases"][c] = case(pools[rank], tokens, adapters, log)
        if args.out:                             # after each case: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    for line in log:
        print("log:", line)


if __name__ == "__main__":
    main()
