"""In-process engine benchmark (issue 9): a model geometry with random weights, adapters made on
the spot, workloads S0/S1/S100/S1000; closed loop (C concurrent, a finished request replaced)
or open loop (Poisson arrivals). The bench thread drives engine.step() itself (no engine
thread), timing every step and recording what it held.

Per workload: output tok/s, TTFT and TPOT p50/p99, steps/s, batch size over time, decode step
time p50 beside its floor = (base weight bytes + KV bytes read + A/B bytes of the distinct
adapters in the step) / device-to-device copy bandwidth measured in this run (bytes read +
written), the GPU time of the forward (CUDA events) vs the step's wall time (the rest is
host work), adapter loads and their copy latency p50/p99 (pinned CPU -> slot, CUDA events on
the copy stream), GPU memory, the host time of each phase of engine.step() (bench/step_phases.py).
Optional: the transformers + PEFT mixed-adapter baseline; a cProfile of each workload (--cprofile N).

Usage: python bench/engine.py [--model llama3-8b] [--workloads S0,S1,S100,S1000] [--requests 256]
       [--concurrency 64] [--rate R] [--peft-baseline] [--out bench/results/engine-h200.json]
       python bench/engine.py --quick          # CPU smoke: tiny model, a few requests
       python bench/engine.py ... --cprofile 30   # diagnosis: where the engine thread's host time goes
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine_setup import (  # noqa: E402
    WORKLOADS,
    BenchAdapterSource,
    Workload,
    adapter_sequence,
    make_model_dir,
    random_prompts,
)
from bench.engine_stats import StepRecorder, pct, summarize  # noqa: E402
from bench.step_phases import top_functions  # noqa: E402
from inference_worker.config import EngineConfig  # noqa: E402
from inference_worker.engine import LLMEngine  # noqa: E402
from inference_worker.gc_freeze import freeze_startup_objects, unfreeze  # noqa: E402
from inference_worker.interfaces import EngineRequest, RequestOutput, SamplingConfig  # noqa: E402

WARMUP = Workload("W", 16)
WORKLOADS["W"] = WARMUP


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s (read + written) of a 1 GiB device-to-device copy, best of 10 after clocks-up."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * n * 4 / min(times[2:])


class Run:
    """One workload's requests through the engine, closed or open loop."""

    def __init__(self, engine: LLMEngine, recorder: StepRecorder, args, workload: Workload,
                 adapters: list[str] | None = None) -> None:
        """adapters: each request's adapter ref (default: the workload's sequence of its own keys)."""
        self.engine, self.recorder, self.args, self.workload = engine, recorder, args, workload
        self.source = recorder.source
        self.adapters = adapters if adapters is not None else adapter_sequence(workload, args.requests, args.seed)
        self.prompts = random_prompts(engine.vocab_size, args.requests, args.prompt_len, args.seed)
        self.token_times: dict[str, list[float]] = {}
        self.arrivals: dict[str, float] = {}
        self.finished: list[str] = []
        self.next_index = 0

    def _on_output(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        self.token_times[out.request_id].extend([now] * len(out.token_ids))
        if out.finished:
            if out.finish_reason not in ("length",):
                raise RuntimeError(f"{out.request_id} finished with {out.finish_reason}: {out.error}")
            self.finished.append(out.request_id)

    def _submit(self) -> None:
        i = self.next_index
        self.next_index += 1
        rid = f"{self.workload.name}-{i}"
        self.token_times[rid] = []
        self.arrivals[rid] = time.perf_counter()
        sampling = SamplingConfig(max_tokens=self.args.output_len, temperature=self.args.temperature, ignore_eos=True)
        self.engine.add_request(EngineRequest(rid, self.prompts[i], sampling, adapter=self.adapters[i],
                                              on_output=self._on_output))

    def run(self, cprofile_top: int = 0) -> dict:
        """cprofile_top: > 0 profiles the run and reports its that many busiest functions."""
        args, engine = self.args, self.engine
        total = args.requests
        self.source.prepare(self.workload)
        pool = engine.slot_pool
        loads_before, waits_before, staged_before = pool.num_loads, pool.num_step_waits, pool.num_staged_loads
        held_before = engine.scheduler.num_held_steps
        engine.slot_pool.load_timings = []
        self.recorder.reset()
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        profile = cProfile.Profile() if cprofile_top else None
        if profile is not None:
            profile.enable()
        try:
            wall = self._drive(total)
        finally:
            if profile is not None:
                profile.disable()
        res = self._metrics(wall, pool.num_loads - loads_before)
        if profile is not None:
            res["cprofile_top"] = top_functions(profile, cprofile_top)
        res["steps_waiting_on_loads"] = pool.num_step_waits - waits_before   # issue 9: should be 0
        res["staged_loads"] = pool.num_staged_loads - staged_before          # one copy + fill kernels
        res["held_prefill_steps"] = engine.scheduler.num_held_steps - held_before
        return res

    def _drive(self, total: int) -> float:
        """Submit and step until `total` requests finished; -> the wall seconds."""
        args = self.args
        start = time.perf_counter()
        if args.rate:                                   # open loop: Poisson arrival times
            rng = random.Random(args.seed + 1)
            due, t = [], 0.0
            for _ in range(total):
                t += rng.expovariate(args.rate)
                due.append(start + t)
        else:
            for _ in range(min(args.concurrency, total)):
                self._submit()
        while len(self.finished) < total:
            if args.rate:
                while self.next_index < total and due[self.next_index] <= time.perf_counter():
                    self._submit()
            if not self.recorder.timed_step():
                if args.rate and self.next_index < total:
                    time.sleep(max(0.0, min(0.01, due[self.next_index] - time.perf_counter())))
            if not args.rate:
                while self.next_index < total and self.next_index - len(self.finished) < args.concurrency:
                    self._submit()
            if time.perf_counter() - start > args.max_seconds:
                raise RuntimeError(f"{self.workload.name}: over --max-seconds {args.max_seconds}")
        return time.perf_counter() - start

    def _metrics(self, wall: float, num_loads: int) -> dict:
        ttft = [(ts[0] - self.arrivals[rid]) * 1e3 for rid, ts in self.token_times.items()]
        tpot = [(ts[-1] - ts[0]) * 1e3 / (len(ts) - 1) for ts in self.token_times.values() if len(ts) > 1]
        out_tokens = sum(len(ts) for ts in self.token_times.values())
        res = {"requests": len(self.token_times), "output_tokens": out_tokens, "wall_s": wall,
               "tok_per_s": out_tokens / wall, "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
               "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99)}
        res.update(self.recorder.summary(wall))
        res.update(load_stats(self.engine, num_loads))
        if self.engine.device.type == "cuda":
            res["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            free, total = torch.cuda.mem_get_info()
            res["gpu_mem_used_gib"] = (total - free) / 2**30
        return res


def load_stats(engine: LLMEngine, num_loads: int) -> dict:
    timings = engine.slot_pool.load_timings or []
    copy_ms, host_ms, queue_ms, issue_ms = [], [], [], []
    names = engine.slot_pool.ISSUE_PHASES
    phases_ms: list[list[float]] = [[] for _ in names]
    for start, end, host_s, queue_s, phases in timings:
        copy_ms.append(start.elapsed_time(end) if start is not None else end * 1e3)
        host_ms.append(host_s * 1e3)
        queue_ms.append(queue_s * 1e3)
        issue_ms.append(sum(phases) * 1e3)
        if len(phases) == len(names):                 # staged loads on CUDA
            for ms, phase in zip(phases_ms, phases):
                ms.append(phase * 1e3)
    engine.slot_pool.load_timings = None
    # host: request -> copies issued; queue: the part spent waiting for the loader thread; issue:
    # the rest, by phase (SlotPool.issue_phases)
    return {"adapter_loads": num_loads, "load_ms_p50": pct(copy_ms, 50), "load_ms_p99": pct(copy_ms, 99),
            "load_host_ms_p50": pct(host_ms, 50), "load_host_ms_p99": pct(host_ms, 99),
            "load_queue_ms_p50": pct(queue_ms, 50), "load_queue_ms_p99": pct(queue_ms, 99),
            "load_issue_ms_p50": pct(issue_ms, 50), "load_issue_ms_p99": pct(issue_ms, 99),
            **{f"load_issue_{name}_ms_p{q}": pct(ms, q) for name, ms in zip(names, phases_ms)
               for q in (50, 99)}}


def peft_baseline(args, device: torch.device) -> dict:
    """transformers + PEFT generate with a batch of mixed adapters (adapter_names), a model of
    --peft-layers layers of the geometry; tok/s scaled by layers / geometry layers."""
    import peft
    import transformers

    from bench.engine_setup import GEOMETRIES
    geom = dict(GEOMETRIES[args.model])
    rope = geom.pop("rope_scaling", None) or {"rope_type": "default"}
    rope["rope_theta"] = geom.pop("rope_theta")
    full_layers = geom["num_hidden_layers"]
    geom["num_hidden_layers"] = min(args.peft_layers, full_layers)
    config = transformers.LlamaConfig(**geom, rope_parameters=rope, rms_norm_eps=1e-5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lcfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(model, lcfg, adapter_name="a0")
    for i in range(1, args.peft_adapters):
        model.add_adapter(f"a{i}", lcfg)
    model = model.to(device=device, dtype=dtype).eval()
    batch = args.peft_batch
    ids = torch.randint(0, geom["vocab_size"], (batch, args.prompt_len), device=device)
    names = [f"a{i % args.peft_adapters}" for i in range(batch)]
    gen = dict(max_new_tokens=args.peft_output_len, min_new_tokens=args.peft_output_len, do_sample=False,
               pad_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=ids[:, :8], adapter_names=names, max_new_tokens=2, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, adapter_names=names, **gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    tokens = (out.shape[1] - args.prompt_len) * batch
    measured = tokens / wall
    return {"layers": geom["num_hidden_layers"], "adapters": args.peft_adapters, "batch": batch,
            "output_len": args.peft_output_len, "tok_per_s_measured": measured,
            "tok_per_s_scaled": measured * geom["num_hidden_layers"] / full_layers,
            "note": f"measured with {geom['num_hidden_layers']} of {full_layers} layers; "
                    "scaled by layers (embedding/lm_head time ignored: the scaled number is optimistic)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3-8b", choices=["llama3-8b", "tiny"])
    p.add_argument("--workloads", default="S0,S1,S100,S1000")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.0, help="open loop: Poisson arrivals per second (0 = closed)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-slots", type=int, default=128)
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--distinct", type=int, default=4, help="distinct weight sets per rank (host memory)")
    p.add_argument("--graph-buckets", default="16,32,48,64", help="'default' = the engine's; 'none' = eager")
    p.add_argument("--warmup", type=int, default=-1, help="warm-up requests (16 adapters); -1 = concurrency")
    p.add_argument("--warmup-each", type=int, default=0,
                   help="unmeasured requests of each workload before it (Triton compiles its kernel variants)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="per workload")
    p.add_argument("--peft-baseline", action="store_true")
    p.add_argument("--peft-layers", type=int, default=4)
    p.add_argument("--peft-adapters", type=int, default=16)
    p.add_argument("--peft-batch", type=int, default=32)
    p.add_argument("--peft-output-len", type=int, default=128)
    p.add_argument("--adapter-load-thread", action=argparse.BooleanOptionalAction, default=None,
                   help="issue adapter copies from a loader thread (EngineConfig.adapter_load_thread; default: on for CUDA)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule each step before the previous one's tokens are read back (default: on for CUDA)")
    p.add_argument("--prompt-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="prompt steps as piecewise CUDA graphs (EngineConfig.prompt_graphs)")
    p.add_argument("--lora-overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA graphs: LoRA shrinks on a second stream beside the base matmuls (EngineConfig.lora_overlap)")
    p.add_argument("--hold-prefill-steps", type=int, default=0,
                   help="ready prompts wait up to N steps for a pending adapter (EngineConfig.hold_prefill_steps)")
    p.add_argument("--warm-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the eager LoRA kernel variants at engine start (default: on for CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, a few requests")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="diagnosis: cProfile each measured workload and report its N busiest functions "
                        "(the profiler slows the host: not for throughput numbers)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.requests, args.concurrency = "tiny", 6, 3
        args.prompt_len, args.output_len, args.max_slots, args.max_rank, args.distinct = 12, 5, 4, 64, 2
        args.warmup, args.peft_layers, args.peft_batch, args.peft_adapters, args.peft_output_len = 2, 2, 4, 2, 4
        args.graph_buckets = "default"
    if args.warmup < 0:
        args.warmup = args.concurrency
    return args


def build_engine(args, model_dir: Path, source: BenchAdapterSource) -> LLMEngine:
    block = 16
    max_len = math.ceil((args.prompt_len + args.output_len) / block) * block
    buckets = {"default": None, "none": None}.get(args.graph_buckets, "custom")
    if buckets == "custom":
        buckets = tuple(int(b) for b in args.graph_buckets.split(","))
    config = EngineConfig(device=args.device, block_size=block, max_num_seqs=args.concurrency,
                          max_model_len=max_len, max_num_batched_tokens=max(2048, max_len, args.concurrency),
                          num_kv_blocks=args.concurrency * (max_len // block) + 1,
                          max_adapter_slots=args.max_slots, max_lora_rank=args.max_rank,
                          cuda_graphs=args.graph_buckets != "none", cuda_graph_buckets=buckets,
                          adapter_load_thread=args.adapter_load_thread, async_scheduling=args.async_scheduling,
                          warm_kernels=args.warm_kernels, hold_prefill_steps=args.hold_prefill_steps,
                          lora_overlap=args.lora_overlap, prompt_graphs=args.prompt_graphs)
    return LLMEngine(config, str(model_dir), source, random_weights=True)


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "") if head else "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = EngineConfig(device=args.device).torch_device
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "command": "python bench/engine.py " + " ".join(argv or sys.argv[1:]),
              "torch": torch.__version__, "triton": _triton_version(), "args": vars(args), "workloads": {}}
    report["copy_bw_TBps"] = copy_bandwidth(device) / 1e12
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(args.model, Path(tmp))
        source = BenchAdapterSource(args.model, args.distinct, pin=device.type == "cuda", device=device)
        start = time.perf_counter()
        engine = build_engine(args, model_dir, source)
        report["engine_init_s"] = time.perf_counter() - start
        freeze_startup_objects()                         # as the worker does (inference_worker/gc_freeze.py)
        report["kernels"] = engine.ops.name
        report["graph_buckets"] = list(engine.runner.graphs.buckets) if engine.runner.graphs else []
        recorder = StepRecorder(engine, source, report["copy_bw_TBps"] * 1e12)
        report["base_weight_gib"] = recorder.base_bytes / 2**30
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "requests": args.warmup})
            report["warmup"] = {"requests": args.warmup, "wall_s": Run(engine, recorder, warm, WARMUP).run()["wall_s"]}
        for name in args.workloads.split(","):
            try:
                if args.warmup_each:
                    warm = argparse.Namespace(**{**vars(args), "requests": args.warmup_each, "seed": args.seed + 7})
                    Run(engine, recorder, warm, WORKLOADS[name]).run()
                report["workloads"][name] = Run(engine, recorder, args, WORKLOADS[name]).run(args.cprofile)
            except Exception as exc:                     # keep the other workloads' numbers
                report["workloads"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: {json.dumps(report['workloads'][name])[:400]}", flush=True)
        engine.stop()
        del engine
        unfreeze()
    if args.peft_baseline:
        try:
            report["peft_baseline"] = peft_baseline(args, device)
        except Exception as exc:
            report["peft_baseline"] = {"error": f"{type(exc).__name__}: {exc}"}
    report["ratios"] = ratios(report)
    write_report(report, summarize(report), args.out)
    return report


def write_report(report: dict, table: str, out: str) -> None:
    """Print the table; with `out`, the JSON there and the table beside it (.md)."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        Path(out).with_suffix(".md").write_text(table + "\n")


def ratios(report: dict) -> dict:
    w = report["workloads"]
    tps = {k: v.get("tok_per_s") for k, v in w.items() if "tok_per_s" in v}
    out = {}
    if tps.get("S0"):
        for k in ("S1", "S100", "S1000"):
            if k in tps:
                out[f"{k}_over_S0"] = tps[k] / tps["S0"]
    peft = report.get("peft_baseline", {}).get("tok_per_s_scaled")
    if peft and "S100" in tps:
        out["S100_over_peft"] = tps["S100"] / peft
    return out


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


if __name__ == "__main__":
    main()
