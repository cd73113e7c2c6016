"""One decode layer's projections with their LoRA, with and without a second stream (issue 9).

A decode step's base matmuls and its LoRA kernels both stream weights from memory. On one
stream the LoRA's eight small launches run after the matmuls, each spending much of its time
on launch latency and ramp-up; on a side stream (EngineConfig.lora_overlap) they run beside the
matmul that shares their input. This times, in a CUDA graph, the four projections of one
Llama-3-8B layer (fused q/k/v, o, fused gate/up, down) through the engine's own LoRALinear
and slot pool, at a decode step's shape: base only, then LoRA all on one stream ("none") and
with each shrink on the side stream ("shrink", the engine's default). The LoRA's cost is each
mode minus base only; its floor is the step's distinct adapters' A/B bytes over the measured
copy bandwidth.

Usage: python bench/lora_overlap.py [--tokens 64] [--out bench/results/lora-overlap-h200.json]   (CUDA only)
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from bench.engine import git_commit, write_report  # noqa: E402
from inference_worker.cuda_graphs import lora_tile, rank_bound_for  # noqa: E402
from inference_worker.lora.layers import LoRALinear  # noqa: E402
from inference_worker.lora.metadata import LoraBatchMeta, segments_of  # noqa: E402
from inference_worker.lora.slot_pool import SlotPool  # noqa: E402
from kernels.backend import get_ops  # noqa: E402

LAYERS = 4            # layer copies per graph (own weights each: no L2 reuse between them)
SLOTS = 128
# name -> (adapters in the step, their ranks (cycled), pool max rank): issue 9's S100 and S1000
# decode steps at 64 tokens, and issue 7's 64 x 64 rank-16 case
CASES = {"S100": (48, [16], 64), "S1000": (46, [8, 16, 32, 64], 64), "64x64-r16": (64, [16], 16)}
MODES = ("none", "shrink")


def make_layers(ops, max_rank: int) -> tuple[list[LoRALinear], SlotPool]:
    dev, dt = torch.device("cuda"), torch.bfloat16
    layers = []
    for _ in range(LAYERS):
        for name, (h_in, widths) in bk.GROUPS.items():
            base = nn.Linear(h_in, sum(widths), bias=False, device=dev, dtype=dt)
            nn.init.normal_(base.weight, std=h_in ** -0.5)
            layers.append(LoRALinear(base, tuple(f"{name}{m}" for m in range(len(widths))), tuple(widths), ops))
    pool = SlotPool([(i // 4, lin) for i, lin in enumerate(layers)], SLOTS, max_rank, 256, dev, dt)
    return layers, pool


def fill_slots(pool: SlotPool, layers: list[LoRALinear], ranks: list[int]) -> None:
    """Random A/B in every slot's first `rank` rows (the slot's true rank; rows past it stay zero)."""
    for slot in range(SLOTS):
        r = ranks[slot % len(ranks)]
        for lin in layers:
            lin.a_pool[slot, :, :r].normal_(std=lin.in_features ** -0.5)
            lin.b_pool[slot, :r].normal_(std=r ** -0.5)
        pool.host_ranks[slot] = r
        pool.slot_ranks[slot] = r
        pool.slot_scales[slot] = 2.0


def step_meta(pool: SlotPool, tokens: int, adapters: int, rng: random.Random) -> LoraBatchMeta:
    """A decode step as the runner lays it out: tokens sorted by slot, one segment per adapter."""
    slots = sorted(rng.sample(range(SLOTS), adapters))
    per_token = sorted(slots + [rng.choice(slots) for _ in range(tokens - adapters)])
    indptr, seg_slots = segments_of(per_token, [1] * tokens)
    indptr += [indptr[-1]] * (tokens - len(seg_slots))          # padded to the bucket, as a graph step
    seg_slots += [-1] * (tokens - len(seg_slots))
    dev = pool.slot_ranks.device
    return LoraBatchMeta(
        has_lora=True, seg_indptr=torch.tensor(indptr, dtype=torch.int32, device=dev),
        seg_slots=torch.tensor(seg_slots, dtype=torch.int32, device=dev), slot_ranks=pool.slot_ranks,
        slot_scales=pool.slot_scales, block_t=lora_tile(tokens, adapters),
        rank_bound=rank_bound_for(max(pool.host_ranks[s] for s in slots), pool.max_rank))


def run_case(name: str, tokens: int, bw: float, rng: random.Random) -> dict:
    adapters, ranks, max_rank = CASES[name]
    ops = get_ops(torch.device("cuda"))
    layers, pool = make_layers(ops, max_rank)
    fill_slots(pool, layers, ranks)
    xs = [torch.randn(tokens, lin.in_features, device="cuda", dtype=torch.bfloat16) for lin in layers]
    side = torch.cuda.Stream()
    base_meta = LoraBatchMeta(False, *(None,) * 4)

    def step(meta):
        return lambda: [lin(x, meta) for lin, x in zip(layers, xs)]

    row = {"case": name, "tokens": tokens, "adapters": adapters, "ranks": ranks, "pool_rank": max_rank}
    row["base_us"] = bk.median_graph_us(step(base_meta)) / LAYERS
    meta = step_meta(pool, tokens, adapters, rng)
    slots = [s for s in meta.seg_slots.tolist() if s >= 0]
    adapter_bytes = sum(pool.host_ranks[s] * sum(lin.in_features * len(lin.module_names) + lin.out_offsets[-1]
                                                 for lin in layers[:4]) * 2 for s in slots)
    row["lora_floor_us"] = adapter_bytes / bw * 1e6
    row["block_t"], row["rank_bound"] = meta.block_t, meta.rank_bound
    for mode in MODES:
        meta.side_stream = side if mode == "shrink" else None
        total = bk.median_graph_us(step(meta)) / LAYERS
        row[f"{mode}_us"], row[f"{mode}_lora_us"] = total, total - row["base_us"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| case | tokens | adapters | base µs | LoRA floor µs | " + " | ".join(
        f"{m}: layer µs (LoRA µs)" for m in MODES) + " |",
        "|---|---|---|---|---|" + "---|" * len(MODES)]
    for r in rows:
        modes = " | ".join(f"{r[f'{m}_us']:.1f} ({r[f'{m}_lora_us']:.1f})" for m in MODES)
        lines.append(f"| {r['case']} | {r['tokens']} | {r['adapters']} | {r['base_us']:.1f} | "
                     f"{r['lora_floor_us']:.1f} | {modes} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/lora_overlap.py needs a CUDA GPU")
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown or args.tokens < max(CASES[c][0] for c in cases if c in CASES):
        raise SystemExit(f"unknown cases {sorted(unknown)} or fewer tokens than adapters")
    bw = bk.copy_bandwidth()
    rng = random.Random(0)
    rows = []
    for name in cases:
        rows.append(run_case(name, args.tokens, bw, rng))
        torch.cuda.empty_cache()                  # the case's pools and weights are gone
    report = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "commit": git_commit(), "command": "python bench/lora_overlap.py " + " ".join(argv or sys.argv[1:]),
              "copy_bandwidth_tb_s": bw / 1e12, "rows": rows}
    header = (f"One Llama-3-8B decode layer's projections + LoRA in a CUDA graph: {report['device']}, "
              f"{report['date'][:19]}, commit {report['commit'][:7]}\n`{report['command']}`; copy bandwidth "
              f"{bw / 1e12:.2f} TB/s\n\n")
    write_report(report, header + table(rows), args.out)
    return report


if __name__ == "__main__":
    main()
