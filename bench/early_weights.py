"""Decode SGMV with the adapter weights read before the PDL wait (config "early") against without, and
the shrink's 2-row programs when programs are few against 4 rows (config "halve"), on a Hopper GPU
(issue 7): one Llama-3-8B layer's LoRA (8 launches), each group's shrink + expand pair, and
each expand alone (back to back over 4 adapter sets), rank-16 adapters. Every graph of a case is
replayed interleaved with the others (bench.kernels.interleaved_medians), so drift hits all variants alike; the
expand's early path is first checked against the reference. Prints one line per case, writes JSON.

Usage: python bench/early_weights.py [--sweep] [--sweep-shrink] [--cases 64x64] --out bench/results/early-weights-h100.json
(CUDA only; results: bench/results/early-weights-h100.md)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from kernels.reference import sgmv_expand_ref  # noqa: E402
from kernels.sgmv_expand import sgmv_expand  # noqa: E402

# name -> (shrink's config, expand's config); "halve": False is the shrink's block rule before the
# H200 sweep of session 12 (4 rows a program however few the programs)
VARIANTS = {"off": ({"early": False}, {"early": False}), "shrink": ({"early": True}, {"early": False}),
            "both": ({"early": True}, {"early": True}), "expand": ({"early": False}, {"early": True}),
            "both.rows4": ({"early": True, "halve": False}, {"early": True})}
CASES = ((64, 64), (16, 16), (1, 1), (256, 256))
REPS = 200
# the early expand sums a [BLOCK_R, BLOCK_N] block over its rows: one warp per 256 columns keeps a
# column's rows in one thread (8 columns a thread, 16-byte loads); more warps spread rows over warps
EXPAND_SWEEP = [{"block_t": 1, "block_n": bn, "block_r": br, "nb_per_prog": nbp, "num_warps": max(1, bn // 256) * wm,
                 "early": True} for bn in (256, 512, 1024) for br in (8, 16) for nbp in (1, 2) for wm in (1, 2)]

SHRINK_SWEEP = [{"block_t": 1, "block_n": bn, "block_k": bk_, "split_k": sk, "num_warps": nw, "early": True}
                for bn in (2, 4, 8) for bk_ in (512, 1024, 2048) for sk in (1, 2) for nw in (4, 8)]


def check(pools: bk.Pools, layer: bk.Layer, meta: dict, early: bool) -> float:
    """Worst relative error of the early expand's added part against the reference, over the groups."""
    worst = 0.0
    for g, (_, widths) in bk.GROUPS.items():
        y = torch.randn_like(layer.y[g])
        args = (bk.offsets_of(widths), meta["indptr"], meta["slots"], pools.ranks, pools.scales)
        got = sgmv_expand(y, pools.b[g], *args, layer.out[g].clone(), config={"early": early})
        want = sgmv_expand_ref(y, pools.b[g], *args, layer.out[g].float())
        worst = max(worst, ((got.float() - want).abs().max() / (want - layer.out[g].float()).abs().max()).item())
    return worst


def case(pools: bk.Pools, tokens: int, adapters: int, variants: dict) -> dict:
    sets = bk.make_sets(tokens, adapters, bk.K_STEPS)
    layer = bk.Layer(tokens, pools.rank)
    graphs, expand_cfgs = {}, []
    for name, (scfg, ecfg) in variants.items():
        sc, ec = {g: scfg for g in bk.GROUPS}, {g: ecfg for g in bk.GROUPS}
        graphs[f"layer.{name}"] = bk.capture_graph(
            lambda sc=sc, ec=ec: [bk.ours_step(pools, layer, m, sc, ec) for m in sets])
        for g in ("qkv", "gate_up"):
            graphs[f"pair.{g}.{name}"] = bk.capture_graph(
                lambda sc=sc, ec=ec, g=g: [bk.ours_step(pools, layer, m, sc, ec, groups=(g,)) for m in sets])
            if ecfg not in expand_cfgs:        # the expand alone once per expand config
                expand = bk._one_op("expand", g, bk.GROUPS[g][1], layer, pools, ecfg)
                graphs[f"alone.{g}.{name}"] = bk.capture_graph(lambda fn=expand: [fn(m) for m in sets])
        expand_cfgs.append(ecfg)
    return bk.interleaved_medians(graphs, REPS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--sweep", action="store_true", help="the early expand's block sizes, each expand alone")
    ap.add_argument("--sweep-shrink", action="store_true", help="the early shrink's block sizes, each shrink alone")
    ap.add_argument("--cases", default=",".join(f"{t}x{a}" for t, a in CASES),
                    help="tokens x adapters to run, e.g. 64x64 (the sweeps take those of 64x64 and 16x16)")
    args = ap.parse_args()
    report = bk.start_report(variants=VARIANTS, cases={})
    pools = bk.Pools(16)
    cases = [tuple(int(n) for n in c.split("x")) for c in args.cases.split(",")]
    sweep_cases = [c for c in cases if c in ((64, 64), (16, 16))]
    for tokens, adapters in cases:
        meta = bk.make_sets(tokens, adapters, 1)[0]
        errs = {ee: check(pools, bk.Layer(tokens, pools.rank), meta, ee) for ee in (False, True)}
        row = case(pools, tokens, adapters, VARIANTS)
        report["cases"][f"{tokens}x{adapters}"] = {"us": row, "expand_rel_err": errs}
        print(f"{tokens} x {adapters}: expand rel err {errs}", flush=True)
        for n, us in row.items():
            print(f"  {n:24s} {us:8.2f} us", flush=True)
        assert max(errs.values()) < 3e-2, errs
    if args.sweep:
        log = []
        report["sweep"] = {f"{t}x{a}": bk.sweep_case(pools, t, a, [], EXPAND_SWEEP, log) for t, a in sweep_cases}
        report["log"] = log
    if args.sweep_shrink:
        log = []
        report["sweep_shrink"] = {f"{t}x{a}": bk.sweep_case(pools, t, a, SHRINK_SWEEP, [], log)
                                  for t, a in sweep_cases}
        report["log_shrink"] = log
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
