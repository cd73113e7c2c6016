"""The chained SGMV launch (kernels/sgmv_chain.py) against shrink + expand, on the H200 (issue 7).

Per decode case (tokens x distinct adapters, adapter rank, pool max rank) and projection group
of a Llama-3-8B layer: the two launches (the default configs, PDL as set) and the chained launch
over a few configs, each timed alone in a CUDA graph (K layer steps over disjoint adapter sets,
as bench/kernels.py); then the whole layer's LoRA both ways, the chain taking each group's best
config. Checks the chain against the two launches first. Prints a table and writes JSON.

Usage: python bench/chain_sweep.py [--out bench/results/chain-sweep-h200.json] [--cases 64x64r16,...]
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
from kernels.sgmv_chain import sgmv_chain, sync_len  # noqa: E402
from kernels.sgmv_expand import sgmv_expand  # noqa: E402
from kernels.sgmv_shrink import sgmv_shrink  # noqa: E402
from kernels.tiles import pick_block_t  # noqa: E402

# name -> (tokens, adapters, adapter rank, pool max rank)
CASES = {"64x64r16": (64, 64, 16, 16), "64x64r16-pool64": (64, 64, 16, 64), "256x256r16": (256, 256, 16, 16),
         "64x8r16": (64, 8, 16, 16), "16x16r16": (16, 16, 16, 16), "1x1r16": (1, 1, 16, 16),
         "64x64r64": (64, 64, 64, 64)}
# chain overrides tried per group (None: the two launchers' defaults, num_warps the larger)
VARIANTS = [None, {"num_warps": 4}, {"num_warps": 8},
            {"expand": {"block_n": 256, "block_r": 16, "nb_per_prog": 1}, "num_warps": 8},
            {"expand": {"block_n": 512, "block_r": 16, "nb_per_prog": 1}, "num_warps": 4},
            {"shrink": {"block_k": 1024}, "num_warps": 4},
            {"shrink": {"split_k": 1}}]


class Case:
    def __init__(self, tokens, adapters, rank, pool_rank):
        self.pools = bk.Pools(pool_rank, num_slots=bk.K_STEPS * adapters)
        self.pools.ranks.fill_(rank)
        self.sets = bk.make_sets(tokens, adapters, bk.K_STEPS, rank_pool_slots=bk.K_STEPS * adapters)
        self.layer = bk.Layer(tokens, pool_rank)
        self.base = {"block_t": pick_block_t(tokens, adapters), "rank_bound": rank}
        self.syncs = {(g, k): torch.zeros(sync_len(tokens, adapters, self.base["block_t"]) + 8, dtype=torch.int32,
                                          device="cuda") for g in bk.GROUPS for k in range(bk.K_STEPS)}

    def two(self, g, m):
        widths = bk.GROUPS[g][1]
        sgmv_shrink(self.layer.x[g], self.pools.a[g], m["indptr"], m["slots"], self.pools.ranks, self.layer.y[g],
                    config=self.base)
        sgmv_expand(self.layer.y[g], self.pools.b[g], bk.offsets_of(widths), m["indptr"], m["slots"],
                    self.pools.ranks, self.pools.scales, self.layer.out[g], config=self.base)

    def chain(self, g, m, k, variant):
        widths = bk.GROUPS[g][1]
        sgmv_chain(self.layer.x[g], self.pools.a[g], self.layer.y[g], self.pools.b[g], bk.offsets_of(widths),
                   m["indptr"], m["slots"], self.pools.ranks, self.pools.scales, self.layer.out[g],
                   self.syncs[(g, k)], config={**self.base, **(variant or {})})

    def time(self, fn, reps=30):
        return bk.median_graph_us(lambda: [fn(m, k) for k, m in enumerate(self.sets)], steps=bk.K_STEPS, reps=reps)

    def check(self, g, variant):
        """The chain's out against the two launches' from the same start (bf16: a few roundings)."""
        m = self.sets[0]
        start = self.layer.out[g].clone()
        self.two(g, m)
        want = self.layer.out[g].clone()
        self.layer.out[g].copy_(start)
        self.chain(g, m, 0, variant)
        torch.cuda.synchronize()
        got = self.layer.out[g].clone()
        self.layer.out[g].copy_(start)
        err = ((got.float() - want.float()).norm() / (want.float() - start.float()).norm()).item()
        return err


def run_case(name, log):
    tokens, adapters, rank, pool_rank = CASES[name]
    case = Case(tokens, adapters, rank, pool_rank)
    row = {"case": name, "tokens": tokens, "adapters": adapters, "rank": rank, "pool_rank": pool_rank,
           "block_t": case.base["block_t"], "groups": {}}
    best = {}
    for g in bk.GROUPS:
        two_us = case.time(lambda m, k, g=g: case.two(g, m))
        results = []
        for variant in VARIANTS:
            try:
                err = case.check(g, variant)
                us = case.time(lambda m, k, g=g, v=variant: case.chain(g, m, k, v))
            except Exception as exc:  # noqa: BLE001 - a config that does not launch is a data point
                log.append(f"{name} {g} {variant}: {exc!r}"[:400])
                err, us = None, float("inf")
            if err is not None and err > 2e-2:
                log.append(f"{name} {g} {variant}: WRONG, rel err {err:.3g}")
                us = float("inf")
            results.append({"variant": variant, "us": us, "err": err})
        results.sort(key=lambda r: r["us"])
        best[g] = results[0]["variant"]
        row["groups"][g] = {"two_us": two_us, "chain_best_us": results[0]["us"], "chain_default_us":
                            next(r["us"] for r in results if r["variant"] is None), "all": results}
        print(f"{name:16s} {g:8s} two {two_us:7.2f}  chain default {row['groups'][g]['chain_default_us']:7.2f}  "
              f"best {results[0]['us']:7.2f} {results[0]['variant']}", flush=True)
    row["layer_two_us"] = case.time(lambda m, k: [case.two(g, m) for g in bk.GROUPS])
    row["layer_chain_default_us"] = case.time(lambda m, k: [case.chain(g, m, k, None) for g in bk.GROUPS])
    row["layer_chain_best_us"] = case.time(lambda m, k: [case.chain(g, m, k, best[g]) for g in bk.GROUPS])
    print(f"{name:16s} LAYER    two {row['layer_two_us']:7.2f}  chain default {row['layer_chain_default_us']:7.2f}  "
          f"chain best {row['layer_chain_best_us']:7.2f}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/chain-sweep-h200.json")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "pdl": os.environ.get("OPENLORA_SGMV_PDL", "1"), "rows": []}
    log = []
    for name in args.cases.split(","):
        res["rows"].append(run_case(name, log))
        torch.cuda.empty_cache()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(res, log=log), f, indent=1, default=str)
    for line in log:
        print("LOG", line)


if __name__ == "__main__":
    main()
