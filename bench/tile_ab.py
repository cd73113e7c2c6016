"""The SGMV token-tile rules of session 13 (kernels/tiles.py) against the rule before them, at the layer
(issue 7): one Llama-3-8B layer's LoRA (8 launches), each group's shrink + expand pair and each expand
alone, rank-16 adapters, every graph of a case replayed interleaved with the others
(bench/early_weights.case), so drift hits both rules alike.

The rule before: one tile for shrink and expand, 1 under 1.5 tokens a segment, 2 under 12, else
min(64, next_pow2(tokens a segment)) (at least 16). Today's: the defaults.

Usage: python bench/tile_ab.py [--cases 64x8,256x64,16x1] --out bench/results/tile-ab-h200.json (CUDA only)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from bench.early_weights import case  # noqa: E402
from kernels.tiles import next_pow2  # noqa: E402

CASES = ((64, 8), (256, 64), (16, 1), (64, 1), (64, 16), (256, 16), (64, 64))


def old_tile(tokens: int, segs: int) -> int:
    avg = tokens / max(segs, 1)
    if avg < 1.5:
        return 1
    return 2 if avg < 12 else min(64, max(16, next_pow2(int(avg))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(f"{t}x{a}" for t, a in CASES))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    report = bk.start_report(cases={})
    pools = bk.Pools(16)
    for c in args.cases.split(","):
        tokens, adapters = (int(n) for n in c.split("x"))
        before = {"block_t": old_tile(tokens, adapters)}
        row = case(pools, tokens, adapters, {"before": (before, before), "now": ({}, {})})
        report["cases"][c] = {"before_tile": before["block_t"], "us": row}
        print(f"{c} (tile before {before['block_t']}): layer {row['layer.before']:.2f} -> {row['layer.now']:.2f} us",
              flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
