"""CUDA graphs of decode-only steps, one per batch-size bucket and LoRA variant.

Why: a decode step of an 8B model is ~1,000 small kernels; launched from Python the
gaps between them cost about as much as the memory-bound work itself. A graph
replays them with no host work. A graph fixes shapes and addresses, so a step of n
decodes runs the graph of the smallest bucket b >= n over the runner's static input
buffers (views of the first b entries), padded: input id 0, position 0, slot_mapping
-1 (no KV write), context_len 0 (attention returns zeros), base model. Rows past n are
computed and dropped. Steps with prefills, or more decodes than the largest bucket,
run as prompt-step graphs (prompt_graphs.py) or eagerly.

LoRA: the decodes are sorted by slot, one segment per adapter, the segment table padded
with empty segments to the graph's width G (the SGMV grid depends on (T, G, token tile)
only). The token tile must suit the step: tiles of 1 token when every token has its own
adapter, 16 when a few adapters hold many tokens each (an adapter's A/B are then read
once per 16 tokens; per-token tiles made one shared adapter cost 3x more on the H200),
64 in buckets of 256+ rows when adapters hold 33+ tokens each. G is the most segments a
step of that tile can have (table_width), not b: a grid has up to T/tile + G tiles, and a
16-token-tile graph padded to b = 256 segments launched 256 tiles where 16 hold tokens
(H200, one Llama-3-8B layer's LoRA at 256 tokens of one rank-16 adapter: 109.4 µs against
54.1 at G = 65, 44.5 on 64-token tiles; bench/results/decode-graph-width-h200.json).
The shrink's grid also depends on the step's rank bound (the largest rank it may meet):
with the bound 16, a pool sized for rank 64 launches no programs for the padding rows of
rank <= 16 adapters (~14 µs per layer on the H200 at 64 x 64). So each bucket has a graph
without LoRA (a base-only step skips 8 launches per layer) and one per LoRA variant
(tile in bucket_tiles(b), rank bound in rank_bounds(R)). All graphs share one memory pool.
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterator

import torch

from kernels.tiles import pick_block_t

log = logging.getLogger(__name__)

_SMALL_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def default_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, 32, 48, 64, 96, 128, then every 64, ending at max_num_seqs."""
    sizes = [b for b in _SMALL_BUCKETS if b < max_num_seqs]
    sizes += range(192, max_num_seqs, 64)
    return tuple(sizes) + (max_num_seqs,)


LORA_TILES = (1, 2, 16, 64)
LoraVariant = tuple[int, int]      # (token tile, rank bound) of a step's SGMV launches


def rank_bounds(max_rank: int) -> tuple[int, ...]:
    """The shrink rank bounds graphs are captured for: 16 (the common LoRA rank; 8 fits too)
    and the pool's max rank."""
    return tuple(sorted({min(16, max_rank), max_rank}))


def rank_bound_for(step_rank: int, max_rank: int) -> int:
    """The smallest captured bound >= the largest rank among a step's adapters."""
    return next(b for b in rank_bounds(max_rank) if b >= step_rank)


def lora_tile(num_lora_tokens: int, num_lora_segments: int) -> int | None:
    """The graph tile for a step's adapter tokens (None: no adapter in the step)."""
    if not num_lora_segments:
        return None
    block_t = pick_block_t(num_lora_tokens, num_lora_segments)
    return max(t for t in LORA_TILES if t <= block_t)


def bucket_tiles(bucket: int) -> tuple[int, ...]:
    """The LoRA tiles a step of up to `bucket` adapter tokens can take (one adapter for all of them
    takes the largest): the tiles graphs of that bucket are captured for."""
    return tuple(t for t in LORA_TILES if t <= lora_tile(bucket, 1))


@functools.cache                   # asked every graph step
def table_width(bucket: int, tile: int) -> int:
    """The segment-table width G of a graph of `bucket` rows on `tile`-token tiles: the most adapter
    segments a step of that tile can have, plus one for the base tokens (the decodes are sorted by
    slot: base rows form one segment). A tile needs a mean of tokens per adapter (lora_tile), so the
    most segments come with the most tokens: a step of `bucket` adapter tokens (tests check it
    against every smaller one)."""
    most = max((g for g in range(1, bucket + 1) if lora_tile(bucket, g) >= tile), default=0)
    return min(bucket, most + 1)


def pick_bucket(buckets: tuple[int, ...], num_decodes: int) -> int | None:
    """Smallest bucket >= num_decodes (buckets sorted); None when none is large enough."""
    i = bisect.bisect_left(buckets, num_decodes)
    return buckets[i] if i < len(buckets) else None


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """Around a run of captures: the garbage collector collects first, then stays off. A
    collection inside a capture runs the destructors of whatever sat in reference cycles (an
    earlier engine's CUDA events and page-locked buffers), and their CUDA calls, illegal while a
    stream captures, invalidate the capture (on the H200: engine starts in one test process
    failed at random with cudaErrorStreamCaptureInvalidated)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def capture_into(graph: torch.cuda.CUDAGraph, pool, stream: torch.cuda.Stream):
    """torch.cuda.graph in thread-local mode: another thread's CUDA calls (an adapter loader's
    page-locked allocation, an event query) do not invalidate this thread's capture; none of
    them touches the capture stream."""
    return torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local")


def warm_up_on(stream: torch.cuda.Stream, run: Callable[..., object], *args) -> None:
    """run(*args) once eagerly on the capture stream before a capture (compiles Triton kernels,
    fills the allocator's caches), then wait for it."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


class DecodeGraphs:
    """Captured decode graphs; `run_step(b, variant)` (ModelRunner.static_decode_forward) runs
    the model over the static buffers of bucket b (LoRA with that (tile, rank bound), None = no
    LoRA) and returns its logits [b, V]."""

    def __init__(self, buckets: tuple[int, ...], max_rank: int) -> None:
        self.buckets = tuple(sorted(set(buckets)))
        # per bucket: no LoRA, and each (tile, rank bound) its steps can take
        self.variants: dict[int, list[LoraVariant | None]] = {
            b: [None, *((t, r) for t in bucket_tiles(b) for r in rank_bounds(max_rank))] for b in self.buckets}
        self._graphs: dict[tuple[int, LoraVariant | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket_for(self, num_decodes: int) -> int | None:
        return pick_bucket(self.buckets, num_decodes)

    def capture(self, run_step: Callable[[int, LoraVariant | None], torch.Tensor]) -> None:
        """Largest bucket first, so smaller graphs reuse its pool memory."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        with no_collection():
            for b in reversed(self.buckets):
                for variant in self.variants[b]:
                    warm_up_on(stream, run_step, b, variant)
                    graph = torch.cuda.CUDAGraph()
                    with capture_into(graph, pool, stream):
                        logits = run_step(b, variant)
                    self._graphs[(b, variant)] = (graph, logits)
                    graph.replay()        # the first replay uploads the graph: now, not in a serving step
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (buckets %s, LoRA (tile, rank bound) %s) in %.1f s",
                 len(self._graphs), self.buckets, self.variants[self.buckets[-1]][1:], time.perf_counter() - start)

    def replay(self, bucket: int, variant: LoraVariant | None) -> torch.Tensor:
        """-> logits [bucket, V] float32 (a static buffer: overwritten by the next replay)."""
        graph, logits = self._graphs[(bucket, variant)]
        graph.replay()
        return logits
