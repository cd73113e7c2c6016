"""The decode dot-tile block rules of session 14 against the rules before them, at the layer (issue 7).

Decode steps of 4+ tokens a segment run the SGMV on 16-token tl.dot tiles (kernels/tiles.py). Session 14
changed their blocks: the expand of ranks <= 16 takes the loop-free path (config "prefetch", one block of
256 columns a program); the shrink on dot tiles 4 splits and 4 stages, that on 2-token tiles 2 rows a
program when programs are few (config "halve", before only for 1-token tiles); gate/up inside the activation (kernels/lora_silu_mul.py, the engine's
decode graphs at tile 16) the loop-free path ("one_step"). Per case, interleaved (bench.kernels.interleaved_medians):
one Llama-3-8B layer's LoRA (8 launches) under each rule, each expand alone, and lora_silu_mul with and
without one_step; rank-16 adapters. `--prompt` adds 2048 x 8 prompt tiles (32 tokens) of the expand and
lora_silu_mul with and without the loop-free path, which the defaults leave off there (not measured before).

Usage: python bench/dot_ab.py [--cases 256x64,64x8] [--prompt] --out bench/results/dot-ab-h200.json (CUDA only)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from kernels.lora_silu_mul import lora_silu_mul  # noqa: E402
from kernels.tiles import DOT_TILE, LONG_H_IN, cdiv, next_pow2, pick_block_t, shrink_tile  # noqa: E402

CASES = ((256, 64), (256, 16), (64, 8), (64, 16), (256, 1), (16, 1), (64, 64))
REPS = 200


def before(tokens: int, adapters: int) -> tuple[dict, dict]:
    """(shrink configs, expand configs) per group under the session-13 rules, for decode steps on dot tiles
    (whose shrinks take dot tiles or 2-token tiles); empty where the step does not use them (the rules did
    not change there)."""
    if pick_block_t(tokens, adapters) != DOT_TILE:
        return {}, {}
    shrink, expand = {}, {}
    for g, (h_in, widths) in bk.GROUPS.items():
        n = sum(widths)
        bn = 256 if n <= 8192 else 128
        nb = 2 if cdiv(tokens, DOT_TILE) * cdiv(n, bn) >= 1024 else 1
        expand[g] = {"block_t": DOT_TILE, "block_n": bn, "block_r": 16, "nb_per_prog": nb, "num_warps": 4,
                     "num_stages": 2, "prefetch": False}
        tile = shrink_tile(DOT_TILE, tokens, h_in)
        if tile < DOT_TILE:                   # 2-token tiles: 4 rows a program however few the programs
            shrink[g] = {"block_t": tile, "halve": False}
        elif h_in <= LONG_H_IN:
            ncol = len(widths) * 16
            sbn = min(64, max(16, next_pow2(ncol)))
            split = 4 if cdiv(tokens, DOT_TILE) * cdiv(ncol, sbn) >= 32 else 16
            shrink[g] = {"block_t": DOT_TILE, "block_n": sbn, "block_k": 128, "split_k": split, "num_warps": 4,
                         "num_stages": 3}
    return shrink, expand


def silu(pools: bk.Pools, layer: bk.Layer, cfg: dict):
    g = "gate_up"
    return lambda m: lora_silu_mul(layer.y[g], pools.b[g], layer.out[g], m["indptr"], m["slots"], pools.ranks,
                                   pools.scales, config=cfg)


def case(pools: bk.Pools, tokens: int, adapters: int, prompt: bool) -> dict:
    sets = bk.make_sets(tokens, adapters, bk.K_STEPS)
    layer = bk.Layer(tokens, pools.rank)
    graphs = {}
    if prompt:                              # prompt tiles: each op alone with and without the loop-free path
        for pre in (False, True):
            for g, (_, widths) in bk.GROUPS.items():
                fn = bk._one_op("expand", g, widths, layer, pools, {"block_t": 32, "prefetch": pre})
                graphs[f"alone.{g}.prefetch{int(pre)}"] = bk.capture_graph(lambda fn=fn: [fn(m) for m in sets])
            fn = silu(pools, layer, {"block_t": 32, "rank_bound": 16, "one_step": pre})
            graphs[f"silu.one_step{int(pre)}"] = bk.capture_graph(lambda fn=fn: [fn(m) for m in sets])
    else:
        variants = {"before": before(tokens, adapters), "now": ({}, {})}
        for name, (scfg, ecfg) in variants.items():
            graphs[f"layer.{name}"] = bk.capture_graph(
                lambda scfg=scfg, ecfg=ecfg: [bk.ours_step(pools, layer, m, scfg, ecfg) for m in sets])
            for g, (_, widths) in bk.GROUPS.items():
                fn = bk._one_op("expand", g, widths, layer, pools, ecfg.get(g))
                graphs[f"alone.{g}.{name}"] = bk.capture_graph(lambda fn=fn: [fn(m) for m in sets])
        for one in (False, True):
            fn = silu(pools, layer, {"block_t": DOT_TILE, "rank_bound": 16, "one_step": one})
            graphs[f"silu.one_step{int(one)}"] = bk.capture_graph(lambda fn=fn: [fn(m) for m in sets])
    return bk.interleaved_medians(graphs, REPS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(f"{t}x{a}" for t, a in CASES))
    ap.add_argument("--prompt", action="store_true", help="also 2048 x 8 on prompt tiles")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    report = bk.start_report(cases={})
    pools = bk.Pools(16)
    runs = [(c, False) for c in args.cases.split(",")] + ([("2048x8", True)] if args.prompt else [])
    for c, prompt in runs:
        tokens, adapters = (int(n) for n in c.split("x"))
        row = case(pools, tokens, adapters, prompt)
        report["cases"][c + (" prompt" if prompt else "")] = row
        print(c, "prompt" if prompt else "", " ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
