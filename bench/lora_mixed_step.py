"""Host time against GPU time of one layer's LoRA in a prompt-heavy (eager) step (issue 9).

The engine runs decode steps as CUDA graphs but prompt-heavy steps eagerly, so there each SGMV
launch costs host time. This times one Llama-3-8B layer's 8 LoRA launches (4 shrinks, 4 expands)
at a steady-state mixed step — 7 prompts of 256 tokens and 50 decodes over 57 distinct adapters,
launch choices as the engine makes them — two ways: GPU µs (the launches replayed in a CUDA graph)
and host µs (eager calls back to back, no sync). Host > GPU means the step is launch-bound.
Also: the same step as two launches per op (prompt segments, then decode segments), and the
layer's base matmuls. Cases: S100 (rank-16 pool) and S1000 (rank-64 pool, ranks 8..64).

Usage: python bench/lora_mixed_step.py [--out bench/results/lora-mixed-step-h200.json]   (CUDA only)
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from bench.engine import git_commit, write_report  # noqa: E402
from kernels.sgmv_expand import sgmv_expand  # noqa: E402
from kernels.sgmv_shrink import sgmv_shrink  # noqa: E402

PROMPTS, PROMPT_LEN, DECODES, SLOTS, BLOCK_G = 7, 256, 50, 128, 128
CASES = {"S100": (16, [16]), "S1000": (64, [8, 16, 32, 64])}


def meta_of(lens: list[int], slots: list[int]) -> dict:
    indptr = [0]
    for n in lens:
        indptr.append(indptr[-1] + n)
    return {"indptr": torch.tensor(indptr, dtype=torch.int32, device=bk.DEV),
            "slots": torch.tensor(slots, dtype=torch.int32, device=bk.DEV)}


def lora_layer(pools, x, y, out, meta) -> None:
    """One layer's LoRA as an eager engine step launches it (inference_worker/lora/warmup.eager_config)."""
    config = {"block_g": BLOCK_G, "rank_bound": pools.rank}       # the same for shrink and expand
    for g, (_h_in, widths) in bk.GROUPS.items():
        sgmv_shrink(x[g], pools.a[g], meta["indptr"], meta["slots"], pools.ranks, y[g], config=config)
        sgmv_expand(y[g], pools.b[g], bk.offsets_of(widths), meta["indptr"], meta["slots"], pools.ranks,
                    pools.scales, out[g], config=config)


def host_us(fn, calls: int = 20, rounds: int = 7) -> float:
    """Host µs per call: median over rounds of `calls` back-to-back calls (a busy host swings single rounds)."""
    times = []
    for _ in range(rounds):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def run_case(rank: int, ranks: list[int], rng: random.Random) -> dict:
    pools = bk.Pools(rank, num_slots=SLOTS)
    pools.ranks.copy_(torch.tensor([rng.choice(ranks) for _ in range(SLOTS)], dtype=torch.int32))
    slots = rng.sample(range(SLOTS), PROMPTS + DECODES)
    prompt_tokens = PROMPTS * PROMPT_LEN
    layer = bk.Layer(prompt_tokens + DECODES, rank)
    whole = meta_of([PROMPT_LEN] * PROMPTS + [1] * DECODES, sorted(slots[:PROMPTS]) + sorted(slots[PROMPTS:]))
    parts = [(meta_of([PROMPT_LEN] * PROMPTS, sorted(slots[:PROMPTS])), 0, prompt_tokens),
             (meta_of([1] * DECODES, sorted(slots[PROMPTS:])), prompt_tokens, prompt_tokens + DECODES)]

    def rows(d, lo, hi):
        return {g: t[lo:hi] for g, t in d.items()}

    def one():
        lora_layer(pools, layer.x, layer.y, layer.out, whole)

    def split():
        for meta, lo, hi in parts:
            lora_layer(pools, rows(layer.x, lo, hi), rows(layer.y, lo, hi), rows(layer.out, lo, hi), meta)

    base, outs = bk.Base(), {g: torch.empty_like(o) for g, o in layer.out.items()}
    return {"rank": rank, "ranks": ranks,
            "one_gpu_us": bk.median_graph_us(one, reps=20), "one_host_us": host_us(one),
            "split_gpu_us": bk.median_graph_us(split, reps=20), "split_host_us": host_us(split),
            "base_gpu_us": bk.median_graph_us(lambda: base.step(layer, outs), reps=20)}


def table(report: dict) -> str:
    lines = [f"LoRA of one layer in a mixed eager step: {report['device']}, {report['date']}, commit {report['commit']}",
             f"`{report['command']}`; {PROMPTS} x {PROMPT_LEN} prompt tokens + {DECODES} decodes, "
             f"{PROMPTS + DECODES} adapters, 8 SGMV launches (split: 16)", "",
             "| case | pool rank | GPU µs | host µs | split GPU µs | split host µs | base matmuls GPU µs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in report["cases"].items():
        lines.append(f"| {name} | {c['rank']} | {c['one_gpu_us']:.1f} | {c['one_host_us']:.1f} | "
                     f"{c['split_gpu_us']:.1f} | {c['split_host_us']:.1f} | {c['base_gpu_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("lora_mixed_step.py needs a CUDA device")
    torch.manual_seed(0)
    rng = random.Random(0)
    report = {"device": torch.cuda.get_device_name(), "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/lora_mixed_step.py " + " ".join(argv or sys.argv[1:]),
              "cases": {name: run_case(rank, ranks, rng) for name, (rank, ranks) in CASES.items()}}
    write_report(report, table(report), args.out)
    return report


if __name__ == "__main__":
    main()
