"""Piecewise CUDA graphs of prompt steps: the model between attention calls, per token bucket.

Why: a prompt-heavy step of an 8B model launches ~1,500 kernels from Python (each LoRA
launch alone costs tens of µs of host time). On the H200 such a step of ~1,800 tokens
took 40-60 ms to launch against ~50 ms of GPU work, and the launch time swung with any
other load on the host (bench/results/engine-h200-runs.md, session 7). Attention cannot be
captured with the rest (its grid and kernels follow the step's sequence lengths), so each
step is cut at its attention calls into num_layers + 1 pieces (LlamaForCausalLM.run_piece):
piece i finishes layer i-1 and projects layer i's q/k/v; attention i runs eagerly between
pieces i and i+1. Everything else (matmuls, LoRA, norms, rope and the KV write) replays.

A piece's graph fixes the token count: a step of T tokens runs the graphs of the smallest
bucket b >= T over the runner's static buffers, padded as decode graphs pad (input id 0,
position 0, slot_mapping -1: no KV write; rows past the last LoRA segment get no LoRA), its
segment table padded with empty segments to max_num_seqs. Rows past T are computed and
dropped. Buckets are every 128 tokens up to 2,048 (padding costs at most 127 tokens of compute:
~7 % of a 1,800-token step); larger steps run eagerly: they are few (long prompts), their GPU
work dwarfs their launches, and graphs for them would hold their activations' memory (on the
H200, a worker whose buckets went up to 8,192 tokens ran out of memory at start). Each bucket
has graphs without LoRA and with it (token tiles PROMPT_TILE and PROMPT_SHRINK_TILE, the pool's
max rank); all share one memory pool.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from inference_worker.cuda_graphs import capture_into, no_collection, pick_bucket, warm_up_on

log = logging.getLogger(__name__)

# The SGMV token tile of captured prompt steps: what the kernels pick for a steady mixed step
# (~1,800 tokens over ~55 segments: 32 tokens a segment; kernels/tiles.pick_block_t).
PROMPT_TILE = 32
# The shrinks' tile there. A shrink runs on a second stream beside its base matmul, and with
# 32-token tiles its programs (twice as many, each re-reading the slot's A rows) slow that
# matmul down. H200, one Llama-3-8B layer (matmuls + activation, its LoRA as the engine runs it;
# `python bench/prefill_layer.py --tiles ...`, bench/results/prefill-layer-h200.md): 2048 tokens
# x 8 adapters, LoRA +177 µs with 32 against +126 µs with 64; a mixed step (7 x 256 prompt
# tokens + 50 decodes, 57 adapters) +289 against +298 µs. The expands and the activation keep 32.
PROMPT_SHRINK_TILE = 64


MAX_PROMPT_BUCKET = 2048


def default_prompt_buckets(max_tokens: int) -> tuple[int, ...]:
    """Every 128 tokens up to min(max_tokens, MAX_PROMPT_BUCKET), ending there."""
    top = min(max_tokens, MAX_PROMPT_BUCKET)
    return tuple(range(128, top, 128)) + (top,)


class PromptGraphs:
    """Captured pieces; `run(bucket, has_lora, attend)` replays a step's pieces with attend(i)
    (layer i's eager attention into the static buffers) between pieces i and i+1."""

    def __init__(self, buckets: tuple[int, ...], num_pieces: int) -> None:
        self.buckets = tuple(sorted(set(buckets)))
        self.num_pieces = num_pieces
        self._graphs: dict[tuple[int, bool], list[torch.cuda.CUDAGraph]] = {}

    def bucket_for(self, num_tokens: int) -> int | None:
        return pick_bucket(self.buckets, num_tokens)

    def capture(self, run_piece: Callable[[int, bool, int], None]) -> None:
        """run_piece(bucket, has_lora, i) runs piece i over the static buffers. Largest bucket
        first, so the smaller ones reuse its pool memory."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        with no_collection():
            for bucket in reversed(self.buckets):
                for has_lora in (False, True):
                    warm_up_on(stream, self._run_pieces, run_piece, bucket, has_lora)
                    graphs = []
                    for i in range(self.num_pieces):
                        graph = torch.cuda.CUDAGraph()
                        with capture_into(graph, pool, stream):
                            run_piece(bucket, has_lora, i)
                        graphs.append(graph)
                    self._graphs[(bucket, has_lora)] = graphs
                    for graph in graphs:     # the first replay uploads a graph: now, not in a serving step
                        graph.replay()
        torch.cuda.synchronize()
        log.info("captured prompt-step CUDA graphs: %d buckets (%s) x %d pieces, with and without LoRA, in %.1f s",
                 len(self.buckets), self.buckets, self.num_pieces, time.perf_counter() - start)

    def _run_pieces(self, run_piece: Callable[[int, bool, int], None], bucket: int, has_lora: bool) -> None:
        for i in range(self.num_pieces):
            run_piece(bucket, has_lora, i)

    def run(self, bucket: int, has_lora: bool, attend: Callable[[int], None]) -> None:
        for i, graph in enumerate(self._graphs[(bucket, has_lora)]):
            graph.replay()
            if i < self.num_pieces - 1:
                attend(i)
