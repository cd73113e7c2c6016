"""The LoRA's cost inside a 2048-token prompt layer, by interleaved replays (issue 7's prefill target).

One Llama-3-8B layer's matmuls and MLP activation (bench/kernels.Base.step_with_act) over 2048 tokens
of 8 rank-16 adapters, bf16, each variant a CUDA graph: base (no LoRA), each projection's LoRA added
after its matmul, gate/up's LoRA inside the activation (kernels/lora_silu_mul.py), and that with each
shrink on a second stream beside its matmul (what the engine's prompt graphs run); and the matmuls
alone, the target's base. Each rep replays them all back to back, since these ~1.2 ms graphs drift by
10-20 % within a process (clocks, power): a variant's LoRA cost is the median over reps of its time
minus the base's of the same rep (bench/kernels.layer_interleaved).

Usage: python bench/prefill_layer.py [--reps 200] [--mixed] [--tiles 64/32/32,...] [--out FILE.json]      (CUDA only)
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
from bench.lora_mixed_step import DECODES, PROMPT_LEN, PROMPTS, meta_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None, help="JSON of the medians and quartiles")
    ap.add_argument("--mixed", action="store_true",
                    help="a steady mixed step instead (bench/lora_mixed_step.py's: 7 prompts of 256 tokens and "
                         "50 decodes, 57 adapters)")
    ap.add_argument("--tiles", default="", help="more engine variants: shrink/expand/activation token tiles, "
                                                "comma-separated (e.g. 64/32/32,64/64/64)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/prefill_layer.py needs CUDA (one H200-class GPU)")
    torch.manual_seed(0)
    bk.copy_bandwidth()                                    # clocks up
    pools = bk.Pools(16, num_slots=64)
    lens = [PROMPT_LEN] * PROMPTS + [1] * DECODES if args.mixed else [256] * 8
    meta = meta_of(lens, torch.randperm(64)[: len(lens)].tolist())
    tokens = sum(lens)
    layer = bk.Layer(tokens, 16)
    base = bk.Base()
    outs = {g: torch.empty(tokens, sum(w), device="cuda", dtype=torch.bfloat16) for g, (_, w) in bk.GROUPS.items()}
    other = [tuple(int(t) for t in v.split("/")) for v in args.tiles.split(",") if v]
    res = bk.layer_interleaved(base, pools, layer, meta, outs, args.reps, other)
    print(f"{tokens} tokens over {len(lens)} adapters", flush=True)
    med, mm = res["median_us"], res["median_us"]["matmuls"]
    print("median µs: " + "  ".join(f"{k} {v:.1f}" for k, v in med.items()), flush=True)
    for k, v in res["lora_us"].items():
        lo, hi = res["lora_spread_us"][k]
        print(f"LoRA {k:16s} +{v:6.1f} us ({100 * v / mm:4.1f} % of the matmuls; quartiles {lo:.1f} .. {hi:.1f})",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(),
                       "torch": torch.__version__, "command": "python " + " ".join(sys.argv), **res}, f, indent=1)


if __name__ == "__main__":
    main()
