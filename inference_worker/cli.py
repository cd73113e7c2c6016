"""`openlora worker`: serve one base model and many adapters on one device."""
from __future__ import annotations

import argparse

from services.config import store_address

MB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="0.0.0.0:50053", help="HOST:PORT to serve on (default %(default)s)")
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory (safetensors)")
    parser.add_argument("--store", default=store_address(),
                        help="adapter store HOST:PORT (default: $OPENLORA_STORE or %(default)s)")
    parser.add_argument("--worker-id", default="", help="id reported to routers (default hostname:port)")
    parser.add_argument("--base-model", default="",
                        help="base model name adapters must match (default: the model's _name_or_path or dir name)")
    parser.add_argument("--data-dir", default="", help="local disk cache of adapter blobs")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-num-seqs", type=int, default=64, help="running sequences per step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step")
    parser.add_argument("--max-waiting", type=int, default=1024, help="queue limit (RESOURCE_EXHAUSTED past it)")
    parser.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache budget (default: from memory)")
    parser.add_argument("--max-adapter-slots", type=int, default=8, help="adapters resident on the device at once")
    parser.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank served")
    parser.add_argument("--cpu-cache-mb", type=int, default=4096, help="CPU adapter cache budget")
    parser.add_argument("--disk-cache-mb", type=int, default=51200, help="disk adapter cache budget")
    parser.add_argument("--grace-s", type=float, default=10.0, help="drain: time running requests get to finish")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="tokens per streamed message; the first token and the end go at once (default 1: "
                             "every token; more costs the worker less per token)")
    parser.add_argument("--random-weights", action="store_true",
                        help="benchmarks only: draw random weights on the device from config.json (the model "
                             "dir needs no safetensors; outputs are meaningless)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (debugging)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="schedule each step before the previous one's tokens are read back (default: on "
                             "for CUDA)")
    parser.add_argument("--warm-kernels", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the LoRA kernel variants of prompt steps at start, not on first use "
                             "(default: on for CUDA)")
    parser.add_argument("--adapter-load-thread", action=argparse.BooleanOptionalAction, default=None,
                        help="issue adapter copies into device slots from a loader thread (default: on for CUDA)")
    parser.add_argument("--prompt-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="run prompt steps as CUDA graphs between eager attention calls, per token bucket "
                             "(default: on, with CUDA graphs)")
    parser.add_argument("--lora-overlap", action=argparse.BooleanOptionalAction, default=True,
                        help="in CUDA graphs, run each LoRA shrink on a second stream beside its base matmul "
                             "(default: on)")
    parser.add_argument("--hold-prefill-steps", type=int, default=0,
                        help="ready prompts wait up to N steps for a queued request whose adapter is still "
                             "loading, so they share one prompt step (default 0: off)")


def config_from_args(args: argparse.Namespace):
    from inference_worker.config import EngineConfig
    from inference_worker.server import WorkerConfig

    engine = EngineConfig(
        device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
        kv_cache_bytes=args.kv_cache_mb * MB if args.kv_cache_mb else None,
        max_adapter_slots=args.max_adapter_slots, max_lora_rank=args.max_lora_rank,
        cuda_graphs=not args.no_cuda_graphs, async_scheduling=args.async_scheduling,
        adapter_load_thread=args.adapter_load_thread, warm_kernels=args.warm_kernels,
        hold_prefill_steps=args.hold_prefill_steps, lora_overlap=args.lora_overlap,
        prompt_graphs=args.prompt_graphs)
    return WorkerConfig(
        model_dir=args.model, store=args.store, listen=args.listen, worker_id=args.worker_id,
        base_model=args.base_model, data_dir=args.data_dir, cpu_cache_bytes=args.cpu_cache_mb * MB,
        disk_cache_bytes=args.disk_cache_mb * MB, grace_s=args.grace_s, stream_interval=args.stream_interval,
        random_weights=args.random_weights,
        engine=engine)


def run(args: argparse.Namespace) -> int:
    from inference_worker.server import build_worker
    from services.logging_setup import setup_logging
    from services.telemetry import setup_telemetry

    setup_logging("openlora-worker")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"openlora worker: {exc}") from None
    telemetry = setup_telemetry("openlora-worker")
    try:
        return build_worker(config, telemetry).serve_forever()
    finally:
        telemetry.shutdown()
