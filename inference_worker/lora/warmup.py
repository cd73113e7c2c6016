"""Compile the SGMV kernel variants of eager steps before serving.

Why: a Triton kernel compiles the first time a launch makes a new set of compile-time choices
(block sizes picked from the step's token count T and segment count G), on the engine thread,
while every running request waits. Decode steps replay CUDA graphs captured at
start; prompt steps that no prompt graph covers (EngineConfig.prompt_graphs off, or over 2,048
tokens: inference_worker/prompt_graphs.py) run eagerly at any (T, G). On the H200 (bench/results/engine-h200-runs.md,
run 11) the adapter workloads had TTFT p99 of ~3 s where the base model had 0.4 s.

How: eager steps fix the segment-table width (LoraBatchMeta.block_g), so a launch's choices
depend on T and on G only through the token tile the launchers pick from T / G
(kernels.tiles.pick_block_t) and, for the expand's early B reads on dot tiles, whether the step has
few token tiles (sgmv_expand.early_dot_tiles: monotone in G for one tile). For each LoRA layer shape,
eager_variants walks T over the engine's range (TOKEN_STEPS: the choices change at thresholds far wider
than its steps) and one G <= max_segs for each (tile, few tiles) pair; each distinct choice is launched once, at the
smallest T that makes it, on all-base segments (nothing is read from the adapter pools,
nothing written but scratch buffers). tests/kernels/test_warmup.py checks the walk against every (T, G).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from inference_worker.lora.metadata import sgmv_config
from kernels import lora_silu_mul, sgmv_expand, sgmv_shrink
from kernels.tiles import pick_block_t

log = logging.getLogger(__name__)

# (up to T, step): every T to 1024, then every 16th to 8192, then every 256th. Past a few thousand
# tokens only the 64-token tile is left and the choices change at one or two monotone thresholds
# (split-K from 32 tiles, two column blocks a program from 1024 blocks).
TOKEN_STEPS = ((1024, 1), (8192, 16), (None, 256))


def token_counts(max_tokens: int) -> Iterator[int]:
    t = 0
    for bound, step in TOKEN_STEPS:
        bound = max_tokens if bound is None else min(bound, max_tokens)
        while t + step <= bound:
            t += step
            yield t
    if t < max_tokens:
        yield max_tokens


def segment_counts(num_tokens: int, max_segs: int) -> Iterator[int]:
    """One G per (token tile, few token tiles) pair reachable with T tokens (G <= min(T, max_segs))."""
    seen = set()
    for g in range(min(num_tokens, max_segs), 0, -1):
        tile = pick_block_t(num_tokens, g)
        key = (tile, sgmv_expand.early_dot_tiles(num_tokens, g, tile))
        if key not in seen:
            seen.add(key)
            yield g


def eager_config(max_rank: int, block_g: int) -> dict:
    """What an eager step's LoRA layers pass the launchers (ModelRunner.prepare: no token tile,
    the pool's rank, the engine's segment-table width)."""
    return sgmv_config(None, block_g, max_rank)


def variant_key(shape: tuple, num_tokens: int, num_segs: int, block_g: int, dtype: torch.dtype) -> tuple:
    """The compile-time choices of one eager LoRA step's shrink and expand on a layer of `shape`
    = (H_in, M, R, N, silu_mul): what LoRALinear's eager path passes the launchers (a gate/up layer
    feeding the activation takes kernels/lora_silu_mul.py in place of the expand)."""
    h_in, num_mods, max_rank, n, silu_mul = shape
    config = eager_config(max_rank, block_g)
    shrink = sgmv_shrink.launch_config(num_tokens, num_segs, num_mods, max_rank, h_in, True, config)
    if silu_mul:
        expand = lora_silu_mul.launch_config(num_tokens, num_segs, config)
    else:
        expand = sgmv_expand.launch_config(num_tokens, num_segs, n, max_rank, dtype, config)
    return tuple(sorted(shrink.items())), tuple(sorted(expand.items()))


def eager_variants(shape: tuple, max_tokens: int, max_segs: int, block_g: int,
                   dtype: torch.dtype, min_tokens: int = 0) -> dict[tuple, tuple[int, int]]:
    """Distinct variant key -> the first (T, G) that makes it, over steps of min_tokens < T <= max_tokens."""
    variants: dict[tuple, tuple[int, int]] = {}
    for t in token_counts(max_tokens):
        if t <= min_tokens:
            continue
        for g in segment_counts(t, max_segs):
            variants.setdefault(variant_key(shape, t, g, block_g, dtype), (t, g))
    return variants


def layer_shape(lin) -> tuple:
    _, num_mods, max_rank, h_in = lin.a_pool.shape
    return h_in, num_mods, max_rank, lin.b_pool.shape[2], lin.silu_mul


@torch.inference_mode()
def warm_lora_kernels(pool, max_tokens: int, max_segs: int, block_g: int, min_tokens: int = 0) -> int:
    """Launch each eager variant of every distinct LoRA layer shape of the SlotPool's layers
    once, for steps of more than min_tokens tokens (fewer run as prompt graphs, which compile
    their own at capture); -> launch pairs made."""
    start = time.perf_counter()
    by_shape = {}
    for lin in pool.layers:
        by_shape.setdefault(layer_shape(lin), lin)
    if not by_shape:
        return 0
    any_lin = next(iter(by_shape.values()))
    device, dtype = any_lin.a_pool.device, any_lin.a_pool.dtype
    todo = {shape: list(eager_variants(shape, max_tokens, max_segs, block_g, dtype, min_tokens).values())
            for shape in by_shape}
    if not any(todo.values()):
        return 0
    # buffers for the largest T launched, not the token budget (a 128k-context model's budget
    # would need GBs here)
    most = max(t for steps in todo.values() for t, _ in steps)
    x_buf = torch.zeros(most * max(s[0] for s in by_shape), device=device, dtype=dtype)
    out_buf = torch.zeros(most * max(s[3] for s in by_shape), device=device, dtype=dtype)
    slots = torch.full((max_segs,), -1, dtype=torch.int32, device=device)      # all base: no adapter reads
    launches = 0
    for shape, lin in by_shape.items():
        h_in, num_mods, max_rank, n, silu_mul = shape
        config = eager_config(max_rank, block_g)
        for t, g in todo[shape]:
            cuts = [t * i // g for i in range(g + 1)]                          # G non-empty segments
            indptr = torch.tensor(cuts, dtype=torch.int32, device=device)
            x = x_buf[: t * h_in].view(t, h_in)
            y = lin.shrink_scratch[: t * num_mods * max_rank].view(t, num_mods, max_rank)
            out = out_buf[: t * n].view(t, n)
            lin.ops.sgmv_shrink(x, lin.a_pool, indptr, slots[:g], pool.slot_ranks, y, config=config)
            if silu_mul:
                lin.ops.lora_silu_mul(y, lin.b_pool, out, indptr, slots[:g], pool.slot_ranks, pool.slot_scales,
                                      config=config)
            else:
                lin.ops.sgmv_expand(y, lin.b_pool, lin.out_offsets, indptr, slots[:g], pool.slot_ranks,
                                    pool.slot_scales, out, config=config)
            launches += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    log.info("compiled the eager LoRA kernel variants: %d launch pairs over %d layer shapes in %.1f s",
             launches, len(by_shape), time.perf_counter() - start)
    return launches
