"""`make demo`: store + router + 2 workers on the tiny model, 3 fresh adapters, concurrent streams.

Setup (cached under ./.demo): a tiny model and three PEFT adapters made on the
spot. Each run then starts a fresh cluster under ./.demo/run, pushes the adapters,
sends concurrent streaming requests through the router (each adapter twice, the
base model, one merged recipe), prints each answer with the worker that served it
and its timings, and stops everything.
"""
from __future__ import annotations

import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import grpc

from protos import router_pb2_grpc
from services.channels import insecure_channel
from services.generate_cli import StreamResult, build_request, stream_generate
from services.local_cluster import LocalCluster, LocalClusterConfig
from services.store_client import StoreClient

DEMO_DIR = Path(".demo")
# name -> (rank, target modules, seed): mixed ranks and modules in the same batches; legal and
# finance share a rank because ties (like PEFT) merges only equal ranks
ADAPTERS = {
    "legal": (8, ("q_proj", "v_proj"), 1),
    "finance": (8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2),
    "poetry": (4, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), 3),
}
PROMPTS = ["The quick brown fox", "A legal contract binds", "Once upon a time", "finance reports revenue"]
MAX_TOKENS = 24


def setup(root: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny model and the adapters, made once and reused by later runs."""
    import warnings

    from transformers.utils import logging as hf_logging

    from services.peft_adapter import make_adapter
    from services.tiny_model import init_model

    hf_logging.disable_progress_bar()                        # keep the demo's output readable
    warnings.filterwarnings("ignore", category=FutureWarning)

    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        init_model(model_dir)
    adapters = {}
    for name, (rank, modules, seed) in ADAPTERS.items():
        out = root / "adapters" / name
        if not (out / "adapter_model.safetensors").exists():
            make_adapter(model_dir, out, rank=rank, alpha=2.0 * rank, target_modules=modules, seed=seed)
        adapters[name] = out
    return model_dir, adapters


def requests() -> list[tuple[str, object]]:
    """(label, GenerateRequest): each adapter twice, the base model twice, one merge."""
    out = []
    for i, name in enumerate([*ADAPTERS, *ADAPTERS]):
        out.append((f"{name}", build_request(PROMPTS[i % len(PROMPTS)], adapter=name, max_tokens=MAX_TOKENS,
                                             temperature=0.0, request_id=f"{name}-{i}")))
    for i in range(2):
        out.append(("base model", build_request(PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0.0,
                                                request_id=f"base-{i}")))
    out.append(("merge legal:0.7,finance:0.3 (ties)",
                build_request(PROMPTS[1], merge=[("legal", 0.7), ("finance", 0.3)], strategy="ties", density=0.5,
                              max_tokens=MAX_TOKENS, temperature=0.0, request_id="merge-0")))
    return out


def report(label: str, result: StreamResult | grpc.RpcError) -> None:
    if isinstance(result, grpc.RpcError):
        print(f"  {label:<36} error {result.code().name}: {result.details()}")
        return
    print(f"  {label:<36} {result.worker_id:<9} TTFT {result.ttft_s * 1000:6.0f} ms  total "
          f"{result.total_s * 1000:6.0f} ms  {result.tokens_per_s:6.1f} tok/s  {result.tokens} tokens")
    print(f"      {result.text!r}")


def run_requests(router: str) -> dict[str, int]:
    """All requests at once; each printed as it finishes. Returns requests per worker."""
    served: dict[str, int] = {}
    todo = requests()
    with insecure_channel(router) as channel, ThreadPoolExecutor(len(todo)) as pool:
        stub = router_pb2_grpc.RouterStub(channel)
        futures = {pool.submit(stream_generate, stub, request, timeout_s=60): label for label, request in todo}
        for future in as_completed(futures):
            try:
                result = future.result()
                served[result.worker_id] = served.get(result.worker_id, 0) + 1
            except grpc.RpcError as err:
                result = err
            report(futures[future], result)
    return served


def main() -> int:
    started = time.perf_counter()
    root = DEMO_DIR.resolve()
    print(f"setup: tiny model and {len(ADAPTERS)} PEFT adapters under {root} ...", flush=True)
    model_dir, adapters = setup(root)
    shutil.rmtree(root / "run", ignore_errors=True)
    config = LocalClusterConfig(data_dir=root / "run", model_dir=model_dir, num_workers=2,
                                router_port=0, store_port=0, worker_port=0)
    t0 = time.perf_counter()
    with LocalCluster(config) as cluster:
        print(f"started store {cluster.store_address}, workers {', '.join(cluster.worker_addresses)}, "
              f"router {cluster.router_address} in {time.perf_counter() - t0:.1f}s (logs: {config.data_dir}/logs)")
        with StoreClient(cluster.store_address) as store:
            for name, path in adapters.items():
                record = store.upload(path, name)
                print(f"pushed {record.name}@{record.version} rank {record.rank} "
                      f"{', '.join(record.target_modules)} ({record.size_bytes} bytes)")
        print(f"sending {len(requests())} concurrent streaming requests through the router:", flush=True)
        t1 = time.perf_counter()
        served = run_requests(cluster.router_address)
        print(f"all answered in {time.perf_counter() - t1:.1f}s; requests per worker: "
              f"{', '.join(f'{w}: {n}' for w, n in sorted(served.items()))}")
        print("stopping ...", flush=True)
    print(f"stopped cleanly; demo took {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
