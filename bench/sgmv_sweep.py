"""SGMV block-size sweep on the H200 (issue 7): each projection group's shrink and expand alone, over
config lists, at 64 decode tokens x 64 (and 8) rank-16 adapters in pools of max rank 16 and 64, a
2048-token prefill over 8 adapters, and 64 tokens over 46 adapters of ranks 8..64 (`--cases mixed`);
gate/up's LoRA inside the activation (`--cases silu`). Correctness of the defaults first. Prints one
line per op and writes JSON (per op: default, best, every config). What the default configs were tuned from.

Usage: python bench/sgmv_sweep.py --out bench/results/sgmv-sweep-h200.json      (CUDA only)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from kernels.reference import sgmv_expand_ref  # noqa: E402
from kernels.sgmv_expand import sgmv_expand  # noqa: E402

DECODE_EXPAND = [{"block_t": 1, "block_n": bn, "block_r": br, "nb_per_prog": nbp, "num_warps": nw}
                 for bn in (256, 512, 1024, 2048) for br in (8, 16) for nbp in (1, 2) for nw in (4, 8)]
DECODE_SHRINK = [{"block_t": 1, "block_n": bn, "block_k": k, "split_k": 1, "num_warps": 4}
                 for bn in (4, 8, 16) for k in (256, 512)]
TILE2_EXPAND = [{"block_t": 2, "block_n": bn, "block_r": br, "num_warps": nw}
                for bn in (128, 256, 512) for br in (8, 16) for nw in (4, 8)]
# decode of mixed ranks 8..64 in a rank-64 pool (issue 9's S1000): 64 tokens over 46 adapters
MIXED_EXPAND = ([{"block_t": 1, "block_n": bn, "block_r": br, "nb_per_prog": nbp, "num_warps": nw}
                 for bn in (256, 512, 1024) for br in (8, 16, 32) for nbp in (1, 2) for nw in (4, 8)]
                + [{"block_t": 2, "block_n": bn, "block_r": br, "num_warps": nw}
                   for bn in (256, 512) for br in (8, 16) for nw in (4, 8)])
MIXED_SHRINK = ([{"block_t": 1, "block_n": bn, "block_k": k, "split_k": 1, "num_warps": 4}
                 for bn in (4, 8, 16) for k in (256, 512, 1024)]
                + [{"block_t": 2, "block_n": bn, "block_k": k, "split_k": 1, "num_warps": 4}
                   for bn in (4, 8) for k in (256, 512)])
PREFILL_EXPAND = [{"block_t": 64, "block_n": bn, "block_r": 16, "num_warps": nw, "num_stages": ns}
                  for bn in (64, 128, 256) for nw in (4, 8) for ns in (2, 3)]


def check_defaults() -> None:
    """The default configs against the reference on fresh inputs (rank-major B pools)."""
    for max_rank, rank, tokens, adapters in ((64, 16, 64, 64), (16, 16, 64, 64), (64, 64, 2048, 8)):
        pools = bk.Pools(max_rank, num_slots=128)
        pools.ranks.fill_(rank)
        meta = bk.make_sets(tokens, adapters, 1, rank_pool_slots=128)[0]
        layer = bk.Layer(tokens, max_rank)
        for g, (_, widths) in bk.GROUPS.items():
            y = torch.randn_like(layer.y[g])
            got, want = layer.out[g].clone(), layer.out[g].clone()
            args = (bk.offsets_of(widths), meta["indptr"], meta["slots"], pools.ranks, pools.scales)
            sgmv_expand(y, pools.b[g], *args, got)
            sgmv_expand_ref(y, pools.b[g], *args, want)
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            print(f"check R{max_rank} r{rank} {tokens}x{adapters} {g}: rel err {err:.2e}", flush=True)
            assert err < 2e-2, err


def sweep_all(log: list[str]) -> dict:
    """Every case of the sweep (also `bench/kernels.py --sweep`): case name -> per-op results."""
    cases = {}
    for max_rank in (16, 64):
        pools = bk.Pools(max_rank)
        pools.ranks.fill_(16)
        cases[f"decode_64x64_R{max_rank}"] = bk.sweep_case(
            pools, 64, 64, DECODE_SHRINK if max_rank == 64 else [], DECODE_EXPAND, log)
        if max_rank == 64:
            cases["decode_64x8_R64"] = bk.sweep_case(pools, 64, 8, [], TILE2_EXPAND, log)
        del pools
    cases["prefill_2048x8_R16"] = bk.sweep_case(bk.Pools(16), 2048, 8, [], PREFILL_EXPAND, log)
    return cases


def mixed_ranks_case(log: list[str]) -> dict:
    """64 decode tokens over 46 adapters with ranks drawn from 8..64 in a rank-64 pool (S1000's decode)."""
    gen = torch.Generator().manual_seed(0)
    pools = bk.Pools(64)
    pools.ranks.copy_(torch.tensor([8, 16, 32, 64])[torch.randint(0, 4, pools.ranks.shape, generator=gen)])
    return bk.sweep_case(pools, 64, 46, MIXED_SHRINK, MIXED_EXPAND, log)


SILU_CONFIGS = [None, {"block_t": 64, "block_n": 128, "num_warps": 8}, {"block_t": 32, "block_n": 128, "num_warps": 4},
                {"block_t": 32, "block_n": 256, "num_warps": 8}, {"block_t": 64, "block_n": 64, "num_warps": 4},
                {"block_t": 32, "block_n": 64, "num_warps": 4}, {"block_t": 64, "block_n": 256, "num_warps": 8},
                {"block_t": 16, "block_n": 256, "num_warps": 4},
                {"block_t": 32, "block_n": 128, "num_warps": 4, "num_stages": 3}]


def silu_case(log: list[str]) -> dict:
    """Gate/up of prompt steps: the expand then the activation against kernels/lora_silu_mul.py over
    configs (rank 16; 2048 x 8, 2048 x 64, 512 x 8), µs per step of K over disjoint adapter sets."""
    cases = {}
    for tokens, adapters in ((2048, 8), (2048, 64), (512, 8)):
        cases[f"silu_{tokens}x{adapters}_r16"] = _silu_row(tokens, adapters, log)
        torch.cuda.empty_cache()
    return cases


def _silu_row(tokens: int, adapters: int, log: list[str]) -> dict:
    from kernels.activation import silu_and_mul
    from kernels.lora_silu_mul import lora_silu_mul
    pools = bk.Pools(16, num_slots=bk.K_STEPS * adapters)
    sets = bk.make_sets(tokens, adapters, bk.K_STEPS, rank_pool_slots=bk.K_STEPS * adapters)
    layer = bk.Layer(tokens, 16)
    y, b, gate_up = layer.y["gate_up"].normal_(), pools.b["gate_up"], layer.out["gate_up"]
    offsets = bk.offsets_of(bk.GROUPS["gate_up"][1])

    def pair():
        for m in sets:
            silu_and_mul(sgmv_expand(y, b, offsets, m["indptr"], m["slots"], pools.ranks, pools.scales, gate_up))

    def fused(cfg):
        for m in sets:
            lora_silu_mul(y, b, gate_up, m["indptr"], m["slots"], pools.ranks, pools.scales, config=cfg)

    row = {"activation_us": bk.median_graph_us(lambda: [silu_and_mul(gate_up) for _ in sets], steps=bk.K_STEPS),
           "expand_then_activation_us": bk.median_graph_us(pair, steps=bk.K_STEPS), "fused": []}
    for cfg in SILU_CONFIGS:
        try:
            us = bk.median_graph_us(lambda cfg=cfg: fused(cfg), steps=bk.K_STEPS)
        except Exception as exc:  # noqa: BLE001 - a config that does not launch is a data point
            log.append(f"silu {tokens}x{adapters} {cfg}: {exc!r}"[:300])
            us = float("inf")
        row["fused"].append((round(us, 2), cfg))
        print(f"  silu T={tokens} A={adapters} {cfg}: {us:.1f} us (expand + activation "
              f"{row['expand_then_activation_us']:.1f})", flush=True)
    return row


# decode on the tl.dot path: 1-token segments in 16-row tiles (15 rows masked: no bytes moved for them),
# so Triton's pipeliner streams A through shared memory (cp.async, num_stages deep) instead of registers
DOT_DECODE_SHRINK = [{"block_t": 16, "block_n": bn, "block_k": k, "split_k": sk, "num_warps": 4, "num_stages": 4,
                      "pdl": True} for bn in (16, 32) for k in (128, 256) for sk in (1, 2, 4)]
DOT_DECODE_EXPAND = [{"block_t": 16, "block_n": bn, "block_r": 16, "nb_per_prog": nbp, "num_warps": nw,
                      "num_stages": 2, "pdl": True} for bn in (128, 256, 512) for nbp in (1, 2) for nw in (4, 8)]


def dot_decode_case(log: list[str]) -> dict:
    """64 decode tokens x 64 rank-16 adapters (rank-16 pool): the decode configs against the tl.dot path
    over 16-row tiles; every config first checked against the reference."""
    from kernels.reference import sgmv_shrink_ref
    from kernels.sgmv_shrink import sgmv_shrink
    pools = bk.Pools(16)
    pools.ranks.fill_(16)
    m = bk.make_sets(64, 64, 1)[0]
    layer = bk.Layer(64, 16)
    for g, (_, widths) in bk.GROUPS.items():
        layer.x[g].normal_()
        want_y = sgmv_shrink_ref(layer.x[g], pools.a[g], m["indptr"], m["slots"], pools.ranks, layer.y[g].clone())
        y = torch.randn_like(layer.y[g])
        args = (bk.offsets_of(widths), m["indptr"], m["slots"], pools.ranks, pools.scales)
        want_out = sgmv_expand_ref(y, pools.b[g], *args, layer.out[g].clone())
        for cfg in DOT_DECODE_SHRINK:
            got = sgmv_shrink(layer.x[g], pools.a[g], m["indptr"], m["slots"], pools.ranks, layer.y[g].clone(),
                              config=cfg)
            err = ((got - want_y).abs().max() / want_y.abs().max()).item()
            if err > 2e-2:
                log.append(f"dotdecode {g} shrink {cfg}: rel err {err:.2e}")
        for cfg in DOT_DECODE_EXPAND:
            got = sgmv_expand(y, pools.b[g], *args, layer.out[g].clone(), config=cfg)
            err = ((got.float() - want_out.float()).abs().max() / want_out.float().abs().max()).item()
            if err > 2e-2:
                log.append(f"dotdecode {g} expand {cfg}: rel err {err:.2e}")
    print("dotdecode checks:", log or "all configs match the reference", flush=True)
    return bk.sweep_case(pools, 64, 64, DOT_DECODE_SHRINK, DOT_DECODE_EXPAND, log)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--cases", choices=("all", "mixed", "silu", "dotdecode"), default="all",
                    help="mixed: only the mixed-ranks decode case (~6 min on the H200); silu: only gate/up's "
                         "LoRA inside the activation (kernels/lora_silu_mul.py); dotdecode: 64 x 64 rank-16 "
                         "decode against the tl.dot path over 16-row tiles")
    args = ap.parse_args()
    torch.manual_seed(0)
    check_defaults()
    log: list[str] = []
    cases = sweep_all(log) if args.cases == "all" else {}
    if args.cases == "silu":
        cases.update(silu_case(log))
    elif args.cases == "dotdecode":
        cases["decode_64x64_R16_dot"] = dot_decode_case(log)
    else:
        cases["decode_64x46_R64_mixed"] = mixed_ranks_case(log)
    report = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "cases": cases, "log": log}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
