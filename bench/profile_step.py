"""Where a decode step's GPU time goes (issue 9): kernel times by kind, per workload.

Fills the engine with `concurrency` running sequences (S0: base only; S1: one adapter;
S100: adapters drawn from 100) and, once every sequence is decoding, times the same
decode step three ways: the replayed CUDA graph (CUDA events), the eager forward
(CUDA events) and the eager forward under torch.profiler, whose kernels are grouped by
kind (GEMM, LoRA shrink/expand, attention, norms, rope, activation, elementwise, ...).
The sum of kernel times is the GPU work; graph time minus that is what launch gaps cost.

Usage: python bench/profile_step.py [--workloads S0,S1,S100] [--concurrency 64] [--context 320]
       [--out bench/results/profile-step-h200.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import engine as engine_bench  # noqa: E402
from bench.engine_setup import WORKLOADS, BenchAdapterSource, adapter_sequence, make_model_dir  # noqa: E402
from inference_worker.interfaces import EngineRequest, SamplingConfig  # noqa: E402

# kernel-name fragments -> kind; first match wins (lower-case names)
KINDS = (("sgmv_shrink", "lora shrink"), ("sgmv_expand", "lora expand"), ("paged_attention", "attention"),
         ("_attn", "attention"), ("flash", "attention"), ("rms", "norm"), ("rope", "rope"),
         ("silu", "activation"), ("write_kv", "kv write"), ("gemm", "gemm"), ("nvjet", "gemm"),
         ("cutlass", "gemm"), ("xmma", "gemm"), ("argmax", "sampling"), ("reduce", "reduce"),
         ("memset", "memset"), ("memcpy", "memcpy"), ("elementwise", "elementwise"), ("cat", "elementwise"),
         ("index", "gather"))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for frag, kind in KINDS if frag in low), "other")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="S0,S1,S100")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--context", type=int, default=320, help="tokens cached per sequence when profiled")
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    # the engine as bench/engine.py builds it, sized for this context
    eng = engine_bench.parse_args(["--concurrency", str(args.concurrency), "--prompt-len", str(args.context - 64),
                       "--output-len", "128", "--max-rank", str(args.max_rank),
                       "--graph-buckets", str(args.concurrency)])
    return args, eng


def fill(engine, workload, args, eng_args) -> dict:
    """Admit `concurrency` sequences and step until all decode with ~context tokens cached.
    -> the profile of the second step (a prompt-heavy step of up to max_num_batched_tokens
    tokens, after the first compiled its kernels)."""
    refs = adapter_sequence(workload, args.concurrency, seed=3)
    for i, ref in enumerate(refs):
        prompt = [(7 * i + j) % 1000 + 2 for j in range(eng_args.prompt_len)]
        engine.add_request(EngineRequest(f"{workload.name}-{i}", prompt,
                                         SamplingConfig(temperature=0.0, max_tokens=10_000, ignore_eos=True),
                                         adapter=ref))
    engine.step()
    prompt_step = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        prompt_step["wall_ms"] = (time.perf_counter() - start) * 1000
    prompt_step.update(by_kind(prof, 1))
    while len(engine.scheduler.running) < args.concurrency or any(
            s.num_tokens < args.context for s in engine.scheduler.running):
        engine.step()
    return prompt_step


def by_kind(prof, reps: int) -> dict:
    """Kernel time (ms per rep) and calls grouped by kind, plus the top kernels."""
    kinds: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        kind = kind_of(ev.key)
        kinds[kind] += us / reps / 1000
        count[kind] += ev.count // reps
        kernels.append({"name": ev.key[:120], "kind": kind, "ms": us / reps / 1000, "calls": ev.count // reps})
    kernels.sort(key=lambda k: -k["ms"])
    return {"kernel_ms": sum(kinds.values()), "kernel_calls": sum(count.values()),
            "by_kind": {k: {"ms": kinds[k], "calls": count[k]} for k in sorted(kinds, key=lambda k: -kinds[k])},
            "top_kernels": kernels[:15]}


def time_it(fn, iters: int) -> float:
    """ms per call, CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def profile_workload(engine, workload, args, eng_args) -> dict:
    prompt_step = fill(engine, workload, args, eng_args)
    step = engine.scheduler.schedule()                   # room for each sequence's next token
    assert not step.prefills and not step.preempted, "profile a decode-only step"
    running, runner = step.decodes, engine.runner
    graph_batch = runner.prepare([], running)
    graphs, runner.graphs = runner.graphs, None
    eager_batch = runner.prepare([], running)            # no bucket: the eager forward
    runner.graphs = graphs
    with torch.inference_mode():
        graph_ms = time_it(lambda: runner.forward(graph_batch), args.iters) if graph_batch.graph_bucket else None
        eager_ms = time_it(lambda: runner.forward(eager_batch), args.iters)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                runner.forward(eager_batch)
            torch.cuda.synchronize()
    num_adapters = len({s.slot for s in running if s.slot >= 0})
    tile = graph_batch.lora.block_t
    for seq in running:
        engine.abort_request(seq.request_id)
    return {"batch": len(running), "adapters": num_adapters, "graph_lora_tile": tile,
            "graph_ms": graph_ms, "eager_ms": eager_ms, **by_kind(prof, 5), "prompt_step": prompt_step}


def summarize(report: dict) -> str:
    lines = [f"Decode step profile: {report['device']}, {report['date']}, commit {report['commit']}",
             f"`{report['command']}`", "",
             "| workload | batch | adapters | graph ms | eager ms | kernels ms | kernel calls | top kinds (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, w in report["workloads"].items():
        graph = f"{w['graph_ms']:.2f}" if w["graph_ms"] else "-"
        lines.append(f"| {name} | {w['batch']} | {w['adapters']} | {graph} | {w['eager_ms']:.2f} | "
                     f"{w['kernel_ms']:.2f} | {w['kernel_calls']} | {_kinds(w)} |")
    lines += ["", "The second step of each fill (prompts, eager), kernels under the profiler:", "",
              "| workload | step wall ms | kernels ms | kernel calls | top kinds (ms) |", "|---|---:|---:|---:|---|"]
    for name, w in report["workloads"].items():
        p = w["prompt_step"]
        lines.append(f"| {name} | {p['wall_ms']:.1f} | {p['kernel_ms']:.1f} | {p['kernel_calls']} | {_kinds(p)} |")
    return "\n".join(lines)


def _kinds(w: dict) -> str:
    return ", ".join(f"{k} {v['ms']:.2f} ({v['calls']})" for k, v in list(w["by_kind"].items())[:8])


def main(argv=None) -> dict:
    args, eng_args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device")
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(), "commit": engine_bench.git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/profile_step.py " + " ".join(argv or sys.argv[1:]), "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir("llama3-8b", Path(tmp))
        source = BenchAdapterSource("llama3-8b", 4, pin=True, device=device)
        engine = engine_bench.build_engine(eng_args, model_dir, source)
        for name in args.workloads.split(","):
            report["workloads"][name] = profile_workload(engine, WORKLOADS[name], args, eng_args)
            print(name, json.dumps({k: v for k, v in report["workloads"][name].items() if k != "top_kernels"}),
                  flush=True)
    engine_bench.write_report(report, summarize(report), args.out)
    return report


if __name__ == "__main__":
    main()
