"""End-to-end serving benchmark (issue 9): the S100 workload through the services, beside the engine alone.

1. A model dir (a tiny Llama made with init_model, --geometry llama3-8b with random weights drawn on
   the device, or --model-dir) and --num-adapters rank-16 PEFT adapters on all 7 projections
   (bench/serve_setup.py), pushed to the store.
2. gRPC: store, --workers workers and a router as local processes (services.local_cluster);
   --concurrency client threads, each its own channel, stream Generate through the router in a
   closed loop (a finished request is replaced) until --requests are done; prompt_token_ids of
   --prompt-tokens random ids, --output-tokens with ignore_eos, greedy. Client-side TTFT (send ->
   first token) and TPOT, requests per worker, errors, CPU seconds of every process (Linux).
3. In-process: the router and workers stopped (the device is free again), the same requests on an
   LLMEngine made by build_worker from the same worker flags (same model dir, EngineConfig and
   adapter tiers from the same store), driven step by step as bench/engine.py drives it.
4. The ratio gRPC / in-process tok/s (issue 9's target: >= 0.9). Both runs are warmed first with
   one request per adapter (every adapter downloaded and cached; --warmup requests in all).
On CPU every engine gets --cpu-threads torch threads (default cores - 1): the services need a core.

Usage: python bench/serve.py [--num-adapters 100] [--requests 256] [--concurrency 64] [--prompt-tokens 256]
           [--output-tokens 128] [--workers 1] [--device auto|cpu|cuda]
           [--model tiny|small | --geometry llama3-8b | --model-dir DIR]
           [--out bench/results/serve-<device>.json]
       python bench/serve.py --quick          # CPU smoke: tiny model, 4 adapters, a few requests
  GPU:  python bench/serve.py --device cuda --geometry llama3-8b      # the issue's S100, random weights
        python bench/serve.py --device cuda --model-dir /models/Meta-Llama-3-8B   # the same, real weights
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import Run, StepRecorder, _triton_version, copy_bandwidth, git_commit  # noqa: E402
from bench.engine_setup import GEOMETRIES, Workload, adapter_sequence, random_prompts  # noqa: E402
from bench.engine_stats import _fmt, pct  # noqa: E402
from bench.serve_setup import MODELS, describe, make_adapters, make_served_model  # noqa: E402
from inference_worker import cli as worker_cli  # noqa: E402
from inference_worker.config import EngineConfig  # noqa: E402
from protos import router_pb2_grpc  # noqa: E402
from services.channels import insecure_channel  # noqa: E402
from services.generate_cli import build_request, stream_generate  # noqa: E402
from services.local_cluster import LocalCluster, LocalClusterConfig  # noqa: E402
from services.store_client import StoreClient  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", choices=sorted(MODELS), help="tiny model made here (random weights)")
    p.add_argument("--model-dir", default="", help="an existing Hugging Face Llama-family dir instead of --model")
    p.add_argument("--geometry", default="", choices=["", *sorted(GEOMETRIES)],
                   help="a real model shape instead of --model: random bf16 weights drawn on each worker's device")
    p.add_argument("--num-adapters", type=int, default=100)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-tokens", dest="prompt_len", type=int, default=256)
    p.add_argument("--output-tokens", dest="output_len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=-1,
                   help="warm-up requests before each run, cycling over the adapters; -1 = max(adapters, concurrency)")
    # worker flags (`openlora worker`), used for the workers and for the in-process engine alike
    p.add_argument("--device", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-adapter-slots", type=int, default=128)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=int, default=0, help="0 = the worker's default budget")
    p.add_argument("--engine-flag", action="append", default=[], metavar="FLAG",
                   help="an extra worker flag for both runs, e.g. --engine-flag=--async-scheduling (repeatable)")
    p.add_argument("--cpu-threads", type=int, default=-1,
                   help="torch intra-op threads of every engine (workers and the in-process one); -1 = on CPU "
                        "cores - 1, leaving a core to the router, store and clients (torch's default elsewhere); "
                        "0 = torch's default")
    p.add_argument("--max-seconds", type=float, default=600.0, help="per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, 4 adapters, a few requests")
    p.add_argument("--out", default="", help="JSON path (and .md beside it); default bench/results/serve-<device>.json "
                                             "(--quick: a temporary dir)")
    args = p.parse_args(argv)
    if args.num_adapters < 1:
        p.error("--num-adapters must be >= 1")
    if args.quick:
        args.model, args.num_adapters, args.requests, args.concurrency = "tiny", 4, 8, 4
        args.prompt_len, args.output_len, args.max_num_seqs, args.max_adapter_slots = 16, 8, 8, 8
    if args.warmup < 0:
        args.warmup = max(args.num_adapters, args.concurrency)
    if args.cpu_threads < 0:
        is_cpu = EngineConfig(device=args.device).torch_device.type == "cpu"
        args.cpu_threads = max(1, (os.cpu_count() or 2) - 1) if is_cpu else 0
    args.rate = 0.0                                   # closed loop (bench.engine.Run reads it)
    args.model_flags = []                             # the served model's own worker flags (make_served_model)
    return args


def worker_flags(args) -> list[str]:
    flags = ["--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
             "--max-adapter-slots", str(args.max_adapter_slots), "--max-lora-rank", str(args.max_lora_rank)]
    return (flags + (["--kv-cache-mb", str(args.kv_cache_mb)] if args.kv_cache_mb else []) + list(args.model_flags)
            + list(args.engine_flag))


class ClosedLoopClients:
    """--concurrency threads, each with its own channel to the router, sending requests in order."""

    def __init__(self, router: str, prompts: list[list[int]], adapters: list[str], args, tag: str) -> None:
        self.router, self.prompts, self.adapters, self.args, self.tag = router, prompts, adapters, args, tag
        self.results: list = [None] * len(prompts)        # StreamResult or grpc.RpcError
        self._next = 0
        self._lock = threading.Lock()

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= len(self.prompts):
                return None
            self._next += 1
            return self._next - 1

    def _client(self) -> None:
        with insecure_channel(self.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            while (i := self._take()) is not None:
                request = build_request("", adapter=self.adapters[i], max_tokens=self.args.output_len,
                                        temperature=self.args.temperature, ignore_eos=True,
                                        request_id=f"{self.tag}-{i}")
                request.prompt_token_ids.ids.extend(self.prompts[i])
                try:
                    self.results[i] = stream_generate(stub, request, timeout_s=self.args.max_seconds)
                except grpc.RpcError as exc:
                    self.results[i] = exc

    def run(self) -> dict:
        threads = [threading.Thread(target=self._client, name=f"client-{k}", daemon=True)
                   for k in range(min(self.args.concurrency, len(self.prompts)))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self._metrics(time.perf_counter() - start)

    def _metrics(self, wall: float) -> dict:
        done = [r for r in self.results if not isinstance(r, grpc.RpcError)]
        errors = Counter(f"{r.code().name}: {r.details()}"[:200] for r in self.results if isinstance(r, grpc.RpcError))
        per_worker = Counter(r.worker_id for r in done)
        ttft = [r.ttft_s * 1e3 for r in done if r.tokens]
        tpot = [(r.total_s - r.ttft_s) * 1e3 / (r.tokens - 1) for r in done if r.tokens > 1]
        out_tokens = sum(r.tokens for r in done)
        return {"requests": len(done), "errors": sum(errors.values()), "error_kinds": dict(errors),
                "output_tokens": out_tokens, "wall_s": wall, "tok_per_s": out_tokens / wall,
                "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
                "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
                "finish_reasons": sorted({r.finish_reason for r in done}), "per_worker": dict(per_worker),
                # > 1: --stream-interval, or streams that fell behind the engine and caught up
                "tokens_per_message": out_tokens / max(1, sum(r.messages for r in done))}


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_usage(pids: dict[str, int], before: dict[str, float | None], wall: float) -> dict:
    """CPU seconds each process used since `before`, and as cores busy over the wall time."""
    out = {}
    for name, pid in pids.items():
        now = _cpu_s(pid)
        if now is not None and before.get(name) is not None:
            out[name] = {"cpu_s": now - before[name], "cores": (now - before[name]) / wall}
    return out


def run_grpc(cluster: LocalCluster, requests: tuple, warm: tuple, args) -> dict:
    pids = {name: proc.pid for name, proc in cluster.procs.items()} | {"bench (clients)": os.getpid()}
    warm_res = ClosedLoopClients(cluster.router_address, *warm, args, tag="warmup").run()
    before = {name: _cpu_s(pid) for name, pid in pids.items()}
    res = ClosedLoopClients(cluster.router_address, *requests, args, tag="serve").run()
    res["cpu"] = cpu_usage(pids, before, res["wall_s"])
    res["warmup"] = {k: warm_res[k] for k in ("requests", "errors", "error_kinds", "wall_s")}
    return res


class _StoreAdapterSizes:
    """What StepRecorder and Run ask of the bench's adapter source: bytes an adapter adds to a step."""

    def __init__(self, model_dir: Path, rank: int, element_size: int) -> None:
        from inference_worker.adapter_checks import ModelShapes

        shapes = ModelShapes.from_model_dir(model_dir)
        self._bytes = shapes.num_layers * sum(i + o for i, o in shapes.modules.values()) * rank * element_size

    def adapter_bytes(self, key: str) -> int:
        return self._bytes

    def prepare(self, workload: Workload) -> None:
        """Nothing to make: the adapters come from the store through the worker's tiers."""


def run_inprocess(args, model_dir: Path, store: str, data_dir: Path, requests: tuple, warm: tuple,
                  workload: Workload) -> dict:
    """The same requests on an engine build_worker makes from the same flags, stepped by bench.engine.Run."""
    from inference_worker.gc_freeze import freeze_startup_objects, unfreeze
    from inference_worker.server import build_worker

    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    flags = worker_flags(args) + ["--model", str(model_dir), "--store", store, "--listen", "127.0.0.1:0",
                                  "--data-dir", str(data_dir)]
    worker = build_worker(worker_cli.config_from_args(parser.parse_args(flags)))
    engine = worker.engine
    freeze_startup_objects()                 # as the worker process does (Worker.serve_forever)
    try:
        sizes = _StoreAdapterSizes(model_dir, args.rank, torch.empty(0, dtype=engine.config.torch_dtype).element_size())
        recorder = StepRecorder(engine, sizes, copy_bandwidth(engine.device))
        warm_args = argparse.Namespace(**{**vars(args), "requests": len(warm[0]), "seed": args.seed + 1})
        warm_s = Run(engine, recorder, warm_args, workload, adapters=warm[1]).run()["wall_s"]
        res = Run(engine, recorder, args, workload, adapters=requests[1]).run()
        res["warmup"] = {"requests": len(warm[0]), "wall_s": warm_s}
        res.pop("batch_series", None)
        return res
    finally:
        engine.stop()
        worker.manager.close()
        worker.store.close()
        unfreeze()


def serve_and_compare(args, model_dir: Path, tmp: Path, adapters: dict[str, Path], requests: tuple, warm: tuple,
                      workload: Workload) -> dict:
    """Start the cluster, push the adapters, the gRPC run; then router and workers stopped, the in-process run."""
    report = {}
    config = LocalClusterConfig(data_dir=tmp / "cluster", model_dir=model_dir, num_workers=args.workers,
                                router_port=0, store_port=0, worker_port=0, worker_args=tuple(worker_flags(args)))
    cluster = LocalCluster(config)
    try:
        t0 = time.perf_counter()
        cluster.start()
        report["cluster_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with StoreClient(cluster.store_address) as store:
            for name, adapter_dir in adapters.items():
                store.upload(adapter_dir, name)
        report["adapters_pushed_s"] = time.perf_counter() - t0
        report["grpc"] = run_grpc(cluster, requests, warm, args)
        print(f"grpc: {json.dumps(report['grpc'])[:400]}", flush=True)
        for name in ["router", *(f"worker-{i}" for i in range(args.workers))]:
            cluster.kill(name)                       # frees the device for the in-process engine
        report["inprocess"] = run_inprocess(args, model_dir, cluster.store_address, tmp / "inprocess",
                                            requests, warm, workload)
        print(f"inprocess: {json.dumps(report['inprocess'])[:400]}", flush=True)
    finally:
        cluster.stop()
    return report


@contextlib.contextmanager
def cpu_threads(num: int):
    """num torch intra-op threads in this process and in the processes started meanwhile (0: unchanged)."""
    if not num:
        yield
        return
    env_before, threads_before = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(num)
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        if env_before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env_before


def device_label(device: torch.device) -> tuple[str, str]:
    """(full name, short name for file names): ("NVIDIA H200", "h200"), ("cpu", "cpu")."""
    if device.type != "cuda":
        return "cpu", "cpu"
    name = torch.cuda.get_device_name(device)
    return name, name.lower().removeprefix("nvidia ").replace(" ", "-")


def _versions() -> dict:
    import google.protobuf
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": _triton_version(),
            "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
            "transformers": transformers.__version__}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = EngineConfig(device=args.device).torch_device
    device_name, device_short = device_label(device)
    with tempfile.TemporaryDirectory(prefix="openlora-serve-") as tmp:
        tmp = Path(tmp)
        served = make_served_model(args, tmp)
        args.model_flags = served.worker_flags
        report = {"device": device_name,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "commit": git_commit(), "command": "python bench/serve.py " + " ".join(argv or sys.argv[1:]),
                  "cpu_count": os.cpu_count(), "versions": _versions(), "args": vars(args),
                  "worker_flags": worker_flags(args), "model": describe(served.model_dir, served.label)}
        model_dir, model_config = served.model_dir, json.loads((served.model_dir / "config.json").read_text())
        t0 = time.perf_counter()
        adapter_dirs = make_adapters(model_dir, tmp / "adapters", args.num_adapters, args.rank, args.seed,
                                     geometry=args.geometry)
        report["adapters_made_s"] = time.perf_counter() - t0

        # the same requests for both runs: prompts, and adapters uniform over the pushed names
        names = [f"bench-s{args.num_adapters}-{i}" for i in range(args.num_adapters)]
        workload = Workload(f"S{args.num_adapters}", args.num_adapters, ranks=(args.rank,))
        vocab = model_config["vocab_size"]
        picks = adapter_sequence(workload, args.requests, args.seed)
        requests = (random_prompts(vocab, args.requests, args.prompt_len, args.seed),
                    [names[int(key.rpartition("/")[2])] for key in picks])
        warm = (random_prompts(vocab, args.warmup, args.prompt_len, args.seed + 1),
                [names[i % len(names)] for i in range(args.warmup)])

        with cpu_threads(args.cpu_threads):
            report.update(serve_and_compare(args, model_dir, tmp, dict(zip(names, adapter_dirs)), requests, warm,
                                            workload))
    report["ratio_tok_per_s"] = report["grpc"]["tok_per_s"] / report["inprocess"]["tok_per_s"]
    table = summarize(report)
    print(table)
    out = Path(args.out or (Path(tempfile.gettempdir()) / "serve-quick.json" if args.quick
                            else Path(__file__).parent / "results" / f"serve-{device_short}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return report


def summarize(report: dict) -> str:
    a, m = report["args"], report["model"]
    lines = [f"Serving benchmark (gRPC end to end vs in-process engine) on {report['device']} "
             f"({report['cpu_count']} CPU cores), {report['date']}, commit {report['commit']}",
             f"`{report['command']}`; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"Model {m['dir']}: hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, "
             f"{m['num_hidden_layers']} layers, vocab {m['vocab_size']}. {a['num_adapters']} adapters rank {a['rank']} "
             f"on all 7 projections, uniform; {a['requests']} requests, concurrency {a['concurrency']}, "
             f"{a['prompt_len']} prompt + {a['output_len']} output tokens (ignore_eos), {a['workers']} worker(s); "
             f"worker flags `{' '.join(report['worker_flags'])}`; torch threads per engine "
             f"{a['cpu_threads'] or 'default'}", "",
             "| run | tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | requests | errors | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, label in (("grpc", "gRPC: clients -> router -> worker"), ("inprocess", "in-process engine")):
        r = report[name]
        lines.append(f"| {label} | {_fmt(r['tok_per_s'], 0)} | {_fmt(r['ttft_ms_p50'], 0)}/{_fmt(r['ttft_ms_p99'], 0)} | "
                     f"{_fmt(r['tpot_ms_p50'], 2)}/{_fmt(r['tpot_ms_p99'], 2)} | {r['requests']} | "
                     f"{r.get('errors', 0)} | {_fmt(r['wall_s'], 2)} |")
    g, e = report["grpc"], report["inprocess"]
    lines += ["", f"Ratio gRPC / in-process tok/s: **{report['ratio_tok_per_s']:.2f}** (target >= 0.9)",
              "Requests per worker: " + ", ".join(f"{w}: {n}" for w, n in sorted(g["per_worker"].items())),
              f"In-process engine: batch mean {_fmt(e['batch_mean'])}, decode step p50 {_fmt(e['decode_step_ms_p50'], 2)} ms, "
              f"{_fmt(e['steps_per_s'], 0)} steps/s, adapter loads {e['adapter_loads']}"]
    lines.append(f"Tokens per streamed message (gRPC): {_fmt(g.get('tokens_per_message'), 2)}")
    if g.get("cpu"):
        lines.append("CPU during the gRPC run (cores busy): " + ", ".join(
            f"{name} {c['cores']:.2f}" for name, c in g["cpu"].items()))
    if g["errors"]:
        lines.append("gRPC errors: " + "; ".join(f"{n}x {k}" for k, n in g["error_kinds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
