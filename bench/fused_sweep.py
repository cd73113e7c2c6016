"""Fused decode LoRA (kernels/lora_decode.py) against shrink + expand, per projection group of one
Llama-3-8B layer: 64 decode tokens over 64 distinct rank-16 adapters, pools of max rank 16 and 64
(the engine's; rank bound 16), CUDA graphs, µs per launch pair; a config sweep of the fused kernel.

Usage: python bench/fused_sweep.py [--out bench/results/fused-sweep-h200.json]   (CUDA only)
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from kernels.lora_decode import lora_decode  # noqa: E402
from kernels.reference import lora_decode_ref  # noqa: E402
from kernels.sgmv_expand import sgmv_expand  # noqa: E402
from kernels.sgmv_shrink import sgmv_shrink  # noqa: E402

TOKENS, ADAPTERS, RANK = 64, 64, 16
GROUPS = ("qkv", "o", "gate_up")
CONFIGS = [{"chunk": c, "block_k": k, "block_n": n, "num_warps": w}
           for c, k, n, w in itertools.product((1024, 2048, 4096), (256, 1024), (256, 1024), (4, 8))]


def check(pools, layer, meta, g, cfg) -> float:
    """Relative error of the fused kernel against its reference on this case."""
    _, widths = bk.GROUPS[g]
    out = layer.out[g].clone()
    lora_decode(layer.x[g], pools.a[g], pools.b[g], bk.offsets_of(widths), meta["indptr"], meta["slots"],
                pools.ranks, pools.scales, out, block_t=1, rank_bound=RANK, config=cfg)
    want = lora_decode_ref(layer.x[g], pools.a[g], pools.b[g], bk.offsets_of(widths), meta["indptr"], meta["slots"],
                           pools.ranks, pools.scales, layer.out[g].float())
    return float((out.float() - want).norm() / (want - layer.out[g].float()).norm())


def time_group(pools, layer, sets, g, cfg) -> float:
    _, widths = bk.GROUPS[g]
    offsets = bk.offsets_of(widths)
    if cfg == "two-launch":
        def step():
            for m in sets:
                sgmv_shrink(layer.x[g], pools.a[g], m["indptr"], m["slots"], pools.ranks, layer.y[g],
                            config={"rank_bound": RANK})
                sgmv_expand(layer.y[g], pools.b[g], offsets, m["indptr"], m["slots"], pools.ranks, pools.scales,
                            layer.out[g])
    else:
        def step():
            for m in sets:
                lora_decode(layer.x[g], pools.a[g], pools.b[g], offsets, m["indptr"], m["slots"], pools.ranks,
                            pools.scales, layer.out[g], block_t=1, rank_bound=RANK, config=cfg)
    return bk.median_graph_us(step, steps=len(sets), reps=20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "cases": {}}
    for max_rank in (16, 64):
        pools = bk.Pools(max_rank)
        pools.ranks.fill_(RANK)
        sets = bk.make_sets(TOKENS, ADAPTERS, bk.K_STEPS)
        layer = bk.Layer(TOKENS, max_rank)
        for g in GROUPS:
            row = {"two-launch": time_group(pools, layer, sets, g, "two-launch")}
            row["default_rel_err"] = check(pools, layer, sets[0], g, None)
            row["default"] = time_group(pools, layer, sets, g, None)
            for cfg in CONFIGS:
                try:
                    row[json.dumps(cfg)] = time_group(pools, layer, sets, g, cfg)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is a data point
                    row[json.dumps(cfg)] = repr(exc)[:200]
            best = min((v, k) for k, v in row.items() if isinstance(v, float) and k not in ("default_rel_err",))
            print(f"R{max_rank} {g:8s} two-launch {row['two-launch']:6.1f} µs  fused default {row['default']:6.1f} µs "
                  f"(rel err {row['default_rel_err']:.1e})  best {best[0]:6.1f} µs {best[1]}", flush=True)
            report["cases"][f"R{max_rank}.{g}"] = row
        del pools
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
