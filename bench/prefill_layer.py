"""The LoRA's cost inside a 2048-token prompt layer, in alternating rounds (issue 7's prefill target).

One Llama-3-8B layer's matmuls and MLP activation (bench/kernels.Base.step_with_act) over 2048 tokens
of 8 rank-16 adapters, bf16, each variant a CUDA graph timed by its median replay: base (no LoRA),
each projection's LoRA added after its matmul, and gate/up's LoRA inside the activation
(kernels/lora_silu_mul.py), and that with each shrink on a second stream beside its matmul (what the
engine's prompt graphs run). Rounds alternate the four, since these ~1.2 ms graphs
drift by tens of µs between calls (clocks, power); the LoRA's cost is each variant minus the base of
its own round.

Usage: python bench/prefill_layer.py [--rounds 3] [--out FILE.json]      (CUDA only)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON of every round and the medians")
    args = ap.parse_args()
    torch.manual_seed(0)
    bk.copy_bandwidth()                                    # clocks up
    pools = bk.Pools(16, num_slots=64)
    meta = bk.make_sets(2048, 8, 1, rank_pool_slots=64)[0]
    layer = bk.Layer(2048, 16)
    base = bk.Base()
    outs = {g: torch.empty(2048, sum(w), device="cuda", dtype=torch.bfloat16) for g, (_, w) in bk.GROUPS.items()}
    matmuls = bk.median_graph_us(lambda: base.step(layer, outs), reps=30)
    rounds = bk.layer_rounds(base, pools, layer, meta, outs, args.rounds)
    for rnd, r in enumerate(rounds):
        print(f"round {rnd}: " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()) + "  | LoRA " +
              "  ".join(f"{k} +{r[k] - r['base_act']:.1f}" for k in r if k != "base_act") + " us", flush=True)
    added = {k: statistics.median(r[k] - r["base_act"] for r in rounds) for k in rounds[0] if k != "base_act"}
    print(f"matmuls alone {matmuls:.1f} us; median LoRA cost: " +
          "  ".join(f"{k} +{v:.1f} us ({100 * v / matmuls:.1f} %)" for k, v in added.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(),
                       "torch": torch.__version__, "command": " ".join(sys.argv), "matmuls_us": matmuls,
                       "rounds": rounds, "median_added_us": added}, f, indent=1)


if __name__ == "__main__":
    main()
