"""Host against GPU time of single engine steps in a live run (issue 9 diagnosis).

bench/engine.py's steps overlap (async scheduling): a step's wall time mixes its host work
with the previous step's GPU tail, so it cannot say whether prompt-heavy (eager) steps are
bound by the host or the GPU. This runs the same workloads, and for the steps of a window
of each run it syncs the device first, then profiles the one step alone (torch.profiler,
CUDA kernels only) and reports per step kind (prompt-heavy / decode), medians:

  host      engine.step() on the host (its launches; the GPU was idle at its start)
  step      until the device is idle again
  kernels   sum of kernel times; busy: their union; span: first kernel start to last end

busy well under span with host near span: the GPU waited for launches (host-bound).
Per-step syncs change the overlap the engine normally has: not for throughput numbers.

Usage: python bench/step_profile.py [--workloads S0,S100,S1000] [--requests 320]
       [--window 120:700] [--out bench/results/step-profile-h200.json] (and bench/engine.py's flags)
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import engine as engine_bench  # noqa: E402
from bench.engine_setup import WORKLOADS, BenchAdapterSource, make_model_dir  # noqa: E402
from bench.engine_stats import StepRecorder  # noqa: E402
from bench.profile_step import kind_of  # noqa: E402


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs in, ms out)."""
    total, cur = 0.0, None
    for start, end in sorted(intervals):
        if cur is None or start > cur[1]:
            total += cur[1] - cur[0] if cur else 0.0
            cur = [start, end]
        else:
            cur[1] = max(cur[1], end)
    return (total + (cur[1] - cur[0] if cur else 0.0)) / 1e3


def profiled_step(recorder: StepRecorder) -> tuple[bool, dict | None]:
    """One engine step alone on the device, profiled -> (it ran, its row or None)."""
    torch.cuda.synchronize()
    before = len(recorder.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        ran = recorder.timed_step()
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    if not ran or len(recorder.steps) == before:
        return ran, None
    step = recorder.steps[-1]
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = kind_of(e.name)
        kinds[kind] = kinds.get(kind, 0.0) + (e.time_range.end - e.time_range.start) / 1e3
    span = (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e3 if spans else 0.0
    row = {"prompt_heavy": bool(step["prefills"]), "prefill_tokens": step["prefill_tokens"],
           "decodes": step["decodes"], "adapters": len(step["adapters"]), "host_ms": host * 1e3,
           "step_ms": total * 1e3, "kernel_ms": sum(kinds.values()), "busy_ms": busy_ms(spans), "span_ms": span,
           "kernels": len(kernels), "host_phases_ms": step.get("host_ms"), "by_kind_ms": kinds}
    return ran, row


def summarize_kind(rows: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in
           ("host_ms", "step_ms", "kernel_ms", "busy_ms", "span_ms", "prefill_tokens", "decodes", "kernels")}
    kinds: dict[str, float] = {}
    for r in rows:
        for k, v in r["by_kind_ms"].items():
            kinds[k] = kinds.get(k, 0.0) + v / len(rows)
    forward = [r["host_phases_ms"]["forward"] for r in rows if r["host_phases_ms"]]
    return {"steps": len(rows), **med, "forward_host_ms_p10_p90": [statistics.quantiles(forward, n=10)[0],
            statistics.quantiles(forward, n=10)[-1]] if len(forward) >= 2 else None,
            "by_kind_ms_mean": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}


def table(report: dict) -> str:
    lines = [f"Single-step profiles in a live engine run: {report['device']}, {report['date']}, commit {report['commit']}",
             f"`{report['command']}`", "",
             "| workload | steps | kind | prompt tok | decodes | host ms | step ms | kernels ms | GPU busy ms | "
             "GPU span ms | top kernel kinds (ms) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, kinds in report["workloads"].items():
        for kind, s in kinds.items():
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(s["by_kind_ms_mean"].items())[:5])
            lines.append(f"| {name} | {s['steps']} | {kind} | {s['prefill_tokens']:.0f} | {s['decodes']:.0f} | "
                         f"{s['host_ms']:.1f} | {s['step_ms']:.1f} | {s['kernel_ms']:.1f} | {s['busy_ms']:.1f} | "
                         f"{s['span_ms']:.1f} | {top} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--window", default="120:700", help="step indices of each run to profile, START:END")
    ours, rest = p.parse_known_args(argv)
    args = engine_bench.parse_args(["--workloads", "S0,S100,S1000", "--requests", "320", "--warmup", "0",
                                    "--warmup-each", "64", "--graph-buckets", "16,32,48,64", *rest])
    if not torch.cuda.is_available():
        raise SystemExit("bench/step_profile.py profiles CUDA kernels: it needs CUDA")
    first, last = (int(v) for v in ours.window.split(":"))
    report = {"device": torch.cuda.get_device_name(), "command": "python bench/step_profile.py " + " ".join(argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": engine_bench.git_commit(), "window": [first, last], "workloads": {}, "steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        source = BenchAdapterSource(args.model, args.distinct, pin=True, device=torch.device("cuda"))
        engine = engine_bench.build_engine(args, make_model_dir(args.model, Path(tmp)), source)
        recorder = StepRecorder(engine, source, 1.0)
        plain = recorder.timed_step
        for name in args.workloads.split(","):
            warm = argparse.Namespace(**{**vars(args), "requests": args.warmup_each, "seed": args.seed + 7})
            engine_bench.Run(engine, recorder, warm, WORKLOADS[name]).run()
            rows, index = [], [0]

            def step(rows=rows, index=index) -> bool:
                index[0] += 1
                if not first <= index[0] - 1 < last:
                    return plain()
                ran, row = profiled_step(recorder)
                if row is not None:
                    rows.append(row)
                return ran

            recorder.timed_step = step
            engine_bench.Run(engine, recorder, args, WORKLOADS[name]).run()
            recorder.timed_step = plain
            report["steps"][name] = rows
            report["workloads"][name] = {kind: summarize_kind([r for r in rows if r["prompt_heavy"] == heavy])
                                         for kind, heavy in (("prompt-heavy", True), ("decode", False))
                                         if any(r["prompt_heavy"] == heavy for r in rows)}
        engine.stop()
    engine_bench.write_report(report, table(report), args.out)
    return report


if __name__ == "__main__":
    main()
