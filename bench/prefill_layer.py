"""The LoRA's cost inside a 2048-token prompt layer, in alternating rounds (issue 7's prefill target).

One Llama-3-8B layer's matmuls and MLP activation (bench/kernels.Base.step_with_act) over 2048 tokens
of 8 rank-16 adapters, bf16, each variant a CUDA graph timed by its median replay: base (no LoRA),
each projection's LoRA added after its matmul, and gate/up's LoRA inside the activation
(kernels/lora_silu_mul.py, the engine's way). Rounds alternate the three, since these ~1.2 ms graphs
drift by tens of µs between calls (clocks, power); the LoRA's cost is each variant minus the base of
its own round.

Usage: python bench/prefill_layer.py [--rounds 3]      (CUDA only)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    bk.copy_bandwidth()                                    # clocks up
    pools = bk.Pools(16, num_slots=64)
    meta = bk.make_sets(2048, 8, 1, rank_pool_slots=64)[0]
    layer = bk.Layer(2048, 16)
    base = bk.Base()
    outs = {g: torch.empty(2048, sum(w), device="cuda", dtype=torch.bfloat16) for g, (_, w) in bk.GROUPS.items()}
    for rnd, r in enumerate(bk.layer_rounds(base, pools, layer, meta, outs, args.rounds)):
        print(f"round {rnd}: " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()) +
              f"  | LoRA added +{r['added'] - r['base_act']:.1f}  fused +{r['fused'] - r['base_act']:.1f} us",
              flush=True)

if __name__ == "__main__":
    main()
