"""Decode rules A/B at the layer: a snapshot of earlier launch configs ("before") against today's defaults
("now"), over every decode case of bench/kernels.py's table (issue 7).

A snapshot (`--snapshot FILE`, CPU is enough) records, for each case (tokens x adapters x rank, the pool's
rank the adapters') and each group, the explicit block sizes and flags the shrink and expand launchers pick
(kernels/sgmv_*.launch_config, as bench.kernels.ours_step calls them). Taken before a rule change and
committed, it lets the new rules be timed against the old ones at any later commit:
bench/results/decode-rules-s15.json holds session 15's rules (taken at commit fe27050, before session 16's),
decode-rules-s16.json session 16's before its PDL zeroing kernel (commit c7e1982), decode-rules-s17.json the
rules before session 18's (commit db7ce6d), decode-rules-s18.json rank 16's 1-token cases before its 16-row
expand steps (commit 2b11726). A key a snapshot lacks runs as it did before the key existed (BEFORE_KEYS).

Per case, interleaved (bench.kernels.interleaved_medians): one Llama-3-8B layer's LoRA (8 launches) under
"before" (the snapshot's configs as overrides) and "now" (the defaults).

Usage: python bench/decode_ab.py --snapshot bench/results/decode-rules-s15.json [--ranks 16,64,8]
       python bench/decode_ab.py [--before bench/results/decode-rules-s15.json] [--ranks 16,64,8]
           [--cases 64x8,256x64] --out bench/results/decode-ab-s16-h200.json     (CUDA only)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from kernels import sgmv_expand, sgmv_shrink  # noqa: E402

CASES = ((1, 1), (16, 1), (16, 16), (64, 1), (64, 8), (64, 64), (256, 1), (256, 16), (256, 64), (256, 256))
REPS = 200
BEFORE = "bench/results/decode-rules-s15.json"
# the launch config's choices a rule makes (the rest it derives from these and the shapes)
SHRINK_KEYS = ("block_t", "block_n", "block_k", "split_k", "num_warps", "num_stages", "pdl", "early", "zero")
EXPAND_KEYS = ("block_t", "block_n", "block_r", "nb_per_prog", "num_warps", "num_stages", "prefetch", "pdl", "early",
               "early_dot")


# what a snapshot taken before a key existed ran: y zeroed by a memset node (before session 16's PDL kernel)
BEFORE_KEYS = {"shrink": {"zero": "memset"}}


def rules(tokens: int, adapters: int, rank: int) -> dict:
    """{"shrink": {group: cfg}, "expand": {group: cfg}}: the defaults' choices for one case."""
    out = {"shrink": {}, "expand": {}}
    for g, (h_in, widths) in bk.GROUPS.items():
        s = sgmv_shrink.launch_config(tokens, adapters, len(widths), rank, h_in, True)
        e = sgmv_expand.launch_config(tokens, adapters, sum(widths), rank, torch.bfloat16)
        out["shrink"][g] = {k: s[k] for k in SHRINK_KEYS if s.get(k) is not None}
        out["expand"][g] = {k: e[k] for k in EXPAND_KEYS if k in e}
    return out


def snapshot(ranks: list[int], cases: list[tuple[int, int]]) -> dict:
    return {f"{t}x{a}x{r}": rules(t, a, r) for r in ranks for t, a in cases}


def case(pools: bk.Pools, tokens: int, adapters: int, before: dict) -> dict:
    sets = bk.make_sets(tokens, adapters, bk.K_STEPS)
    layer = bk.Layer(tokens, pools.rank)
    # (a key the snapshot lacks: what ran before it existed; launches without split-K ignore "zero")
    old = {op: {g: {**BEFORE_KEYS.get(op, {}), **cfg} for g, cfg in before[op].items()} for op in ("shrink", "expand")}
    variants = {"before": (old["shrink"], old["expand"]), "now": ({}, {})}
    graphs = {name: bk.capture_graph(lambda s=s, e=e: [bk.ours_step(pools, layer, m, s, e) for m in sets])
              for name, (s, e) in variants.items()}
    return bk.interleaved_medians(graphs, REPS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="16,64,8")
    ap.add_argument("--cases", default=",".join(f"{t}x{a}" for t, a in CASES))
    ap.add_argument("--before", default=BEFORE, help="a snapshot of earlier rules")
    ap.add_argument("--snapshot", default="", help="only write today's rules to this file")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    cases = [tuple(int(n) for n in c.split("x")) for c in args.cases.split(",")]
    if args.snapshot:
        with open(args.snapshot, "w") as f:
            json.dump(snapshot(ranks, cases), f, indent=1, sort_keys=True)
        return
    with open(args.before) as f:
        before = json.load(f)
    bk.run_cases(bk.start_report(before=args.before, cases={}), ranks, cases,
                 lambda pools, t, a: case(pools, t, a, before[f"{t}x{a}x{pools.rank}"]), args.out)


if __name__ == "__main__":
    main()
