"""`openlora generate "prompt"`: one request through the router, streamed to stdout.

The text goes to stdout as it arrives; the serving worker and the timings go to
stderr, so `openlora generate ... > out.txt` keeps only the text.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from protos import generate_pb2, router_pb2_grpc
from services.channels import insecure_channel
from services.config import WORKER_METADATA_KEY, router_address


def parse_merge(spec: str) -> list[tuple[str, float]]:
    """'legal:0.7,finance:0.3' -> [('legal', 0.7), ('finance', 0.3)]; refs may carry '@version'."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        ref, sep, weight = part.rpartition(":")
        if not sep or not ref:
            raise ValueError(f"--merge wants ADAPTER:WEIGHT[,ADAPTER:WEIGHT...], got {part!r}")
        out.append((ref, float(weight)))
    if not out:
        raise ValueError("--merge names no adapter")
    return out


def build_request(prompt: str, *, adapter: str = "", merge: list[tuple[str, float]] | None = None,
                  strategy: str = "linear", density: float | None = None, majority_sign_method: str = "",
                  svd_rank: int = 0, merge_seed: int = 0, max_tokens: int = 16, temperature: float | None = None,
                  top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                  stop: list[str] | None = None, ignore_eos: bool = False,
                  request_id: str = "") -> generate_pb2.GenerateRequest:
    sampling = generate_pb2.SamplingParams(max_tokens=max_tokens, top_k=top_k, stop=stop or [],
                                           temperature=temperature, top_p=top_p, seed=seed, ignore_eos=ignore_eos)
    request = generate_pb2.GenerateRequest(request_id=request_id, prompt=prompt, adapter=adapter, sampling=sampling)
    if merge:
        request.merge.CopyFrom(generate_pb2.MergeSpec(
            adapters=[generate_pb2.MergeAdapter(adapter=a, weight=w) for a, w in merge],
            merge_strategy=strategy, density=density, majority_sign_method=majority_sign_method,
            seed=merge_seed, svd_rank=svd_rank))
    return request


@dataclass
class StreamResult:
    text: str = ""
    worker_id: str = ""
    tokens: int = 0
    messages: int = 0                       # messages that carried tokens (a worker may group them)
    ttft_s: float = 0.0                     # client-side: send -> first text
    total_s: float = 0.0
    finish_reason: str = ""                 # length | stop | eos | cancelled
    worker_timings: generate_pb2.Timings | None = None
    chunks: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else 0.0


def stream_generate(stub: router_pb2_grpc.RouterStub, request: generate_pb2.GenerateRequest, *,
                    timeout_s: float | None = None, on_text: Callable[[str], None] | None = None) -> StreamResult:
    """Send one request, call on_text with each delta as it arrives; raises grpc.RpcError."""
    result = StreamResult()
    start = time.perf_counter()
    call = stub.Generate(request, timeout=timeout_s)
    for message in call:
        if not result.tokens and message.token_ids:
            result.ttft_s = time.perf_counter() - start
        result.worker_id = message.worker_id
        result.tokens += len(message.token_ids)
        result.messages += bool(message.token_ids)
        if message.text:
            result.chunks.append(message.text)
            if on_text is not None:
                on_text(message.text)
        if message.finish_reason:
            result.finish_reason = generate_pb2.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower()
            result.worker_timings = message.timings
    result.total_s = time.perf_counter() - start
    result.text = "".join(result.chunks)
    result.worker_id = dict(call.initial_metadata()).get(WORKER_METADATA_KEY, result.worker_id)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--adapter", default="", help="adapter ref NAME or NAME@VERSION (default: the base model)")
    p.add_argument("--merge", default="", metavar="A:W,B:W", help="merge several adapters with weights instead")
    p.add_argument("--strategy", default="linear", help="merge strategy: linear, cat, svd, ties, ties_svd, "
                   "dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd")
    p.add_argument("--density", type=float, default=None, help="merge density (0, 1] for ties/dare/magnitude_prune")
    p.add_argument("--majority-sign-method", default="", choices=["total", "frequency"],
                   help="ties/dare_ties sign election (default total)")
    p.add_argument("--svd-rank", type=int, default=0, help="target rank of the *_svd strategies")
    p.add_argument("--merge-seed", type=int, default=0, help="seed of DARE's random masks")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens even past end-of-text")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--router", default=router_address(), help="router HOST:PORT (default: $OPENLORA_ROUTER "
                                                              "or %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        request = build_request(
            args.prompt, adapter=args.adapter, merge=parse_merge(args.merge) if args.merge else None,
            strategy=args.strategy, density=args.density, majority_sign_method=args.majority_sign_method,
            svd_rank=args.svd_rank, merge_seed=args.merge_seed, max_tokens=args.max_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
            ignore_eos=args.ignore_eos)
    except ValueError as exc:
        raise SystemExit(f"openlora generate: {exc}") from None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with insecure_channel(args.router) as channel:
        try:
            result = stream_generate(router_pb2_grpc.RouterStub(channel), request, timeout_s=args.timeout,
                                     on_text=write)
        except grpc.RpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print()
    worker = result.worker_timings or generate_pb2.Timings()
    print(f"[worker {result.worker_id}] {result.tokens} tokens, finish {result.finish_reason}, "
          f"TTFT {result.ttft_s * 1000:.0f} ms (worker: queue {worker.queue_ms:.0f} ms, adapter load "
          f"{worker.adapter_load_ms:.0f} ms), total {result.total_s * 1000:.0f} ms, "
          f"{result.tokens_per_s:.1f} tok/s", file=sys.stderr)
    return 0
