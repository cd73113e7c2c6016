"""The gate/up LoRA expand fused into the MLP's SiLU-and-multiply (prompt steps).

Math (reference: kernels.reference.lora_silu_mul_ref = sgmv_expand_ref then silu_and_mul_ref),
gate_up [T, 2I] = [gate | up] from the base matmul, y [T, 2, R] from the shrink:
    gate' = round(gate + s * y[t, 0, :r] @ B[slot, :r, :I]),  up' = round(up + s * y[t, 1, :r] @ B[slot, :r, I:])
    out[t, i] = round(round(silu(gate'[t, i])) * up'[t, i])       (base tokens: no delta)
with the roundings of the unfused pair (the expand stores gate_up in its dtype, then
kernels/activation.py), so the result is theirs.

Why: in a prompt step the gate/up expand reads and writes the whole [T, 2I] output (235 MB of
the 2048-token layer's ~460 MB of LoRA traffic: 91 of its 190 µs on the H200), and the
activation reads it once more right after. Here the activation's program computes its
columns' delta in registers from y and B (a few KB per token tile), so the LoRA adds no pass
over gate_up at all (bench/results/prefill-delta-first-h200.md has the alternatives measured).

Grid: 1-D over (token tile, column block of I), sized from host ints (T, G, I): capturable in a
CUDA graph. Launched without programmatic dependent launch: it follows the gate/up matmul
(kernels/_common.launch_options says why). Every token is covered (segment_tile's virtual base
segment takes tokens past the last segment): every token needs its activation. Token tiles of
>= 16 use tl.dot (prompt steps, and decode graphs of 16-token tiles); 1- and 2-token decode tiles keep
sgmv_expand (tuned there) and the plain activation.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from kernels._common import (
    block_g_for,
    check_contiguous,
    check_device,
    check_lora_meta,
    num_tiles_bound,
    segment_tile,
)
from kernels.tiles import DOT_TILE, cdiv, pick_block_t


@triton.jit(do_not_specialize=["T", "G"])
def _lora_silu_mul_kernel(y_ptr, b_ptr, gu_ptr, out_ptr, indptr_ptr, slots_ptr, ranks_ptr, scales_ptr,
                          T, G, INTER, MR,
                          R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_R: tl.constexpr, IEEE: tl.constexpr, ONE_STEP: tl.constexpr):
    pid = tl.program_id(0)
    num_nb = tl.cdiv(INTER, BLOCK_N)
    pid_n = pid % num_nb
    pid_tile = pid // num_nb
    tile_start, tile_end, slot, rank = segment_tile(pid_tile, indptr_ptr, slots_ptr, ranks_ptr, T, G,
                                                    BLOCK_G, BLOCK_T)
    if tile_end <= tile_start:
        return
    offs_t = tile_start + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < tile_end
    n_mask = offs_n < INTER
    mask = t_mask[:, None] & n_mask[None, :]
    g_ptrs = gu_ptr + offs_t[:, None].to(tl.int64) * (2 * INTER) + offs_n[None, :]
    gate = tl.load(g_ptrs, mask=mask, other=0.0)          # issued first: independent of y and B
    up = tl.load(g_ptrs + INTER, mask=mask, other=0.0)
    # base tokens: rank 0 (no steps below), scale 0
    scale = tl.load(scales_ptr + tl.maximum(slot, 0), mask=slot >= 0, other=0.0)
    b_rows = b_ptr + tl.maximum(slot, 0).to(tl.int64) * R * (2 * INTER)
    y_rows = y_ptr + offs_t.to(tl.int64) * MR                # module 0 (gate) at +0, module 1 (up) at +R
    if ONE_STEP:
        # every rank of the step fits one BLOCK_R step (config "rank_bound"): straight-line loads, no loop
        # for the pipeliner to stage them through (as sgmv_expand's "prefetch" path)
        acc_g, acc_u = _gate_up_delta(y_rows, b_rows, 0, rank, t_mask, offs_n, n_mask, INTER, R, BLOCK_R, IEEE)
    else:
        acc_g = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            dg, du = _gate_up_delta(y_rows, b_rows, r0, rank, t_mask, offs_n, n_mask, INTER, R, BLOCK_R, IEEE)
            acc_g += dg
            acc_u += du
    dtype = out_ptr.dtype.element_ty
    g = (gate.to(tl.float32) + scale * acc_g).to(dtype).to(tl.float32)
    u = (up.to(tl.float32) + scale * acc_u).to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + offs_t[:, None].to(tl.int64) * INTER + offs_n[None, :], (act * u).to(dtype), mask=mask)


@triton.jit
def _gate_up_delta(y_rows, b_rows, r0, rank, t_mask, offs_n, n_mask, INTER, R: tl.constexpr, BLOCK_R: tl.constexpr,
                   IEEE: tl.constexpr):
    """Rank rows [r0, r0 + BLOCK_R) of the tile's gate and up deltas: (y_gate B_gate, y_up B_up)."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    y_mask = t_mask[:, None] & r_mask[None, :]
    yg = tl.load(y_rows[:, None] + offs_r[None, :], mask=y_mask, other=0.0)
    yu = tl.load(y_rows[:, None] + R + offs_r[None, :], mask=y_mask, other=0.0)
    b_ptrs = b_rows + offs_r[:, None].to(tl.int64) * (2 * INTER) + offs_n[None, :]
    b_mask = r_mask[:, None] & n_mask[None, :]
    bg = tl.load(b_ptrs, mask=b_mask, other=0.0)
    bu = tl.load(b_ptrs + INTER, mask=b_mask, other=0.0)
    if IEEE:
        return (tl.dot(yg.to(bg.dtype), bg, input_precision="ieee"),
                tl.dot(yu.to(bu.dtype), bu, input_precision="ieee"))
    return tl.dot(yg.to(bg.dtype), bg), tl.dot(yu.to(bu.dtype), bu)


def default_config(num_tokens: int, num_segs: int) -> dict:
    """32-token tiles of 128 columns, 4 warps, 2 stages: the best of a sweep on the H200 (gate/up of
    Llama-3-8B, rank 16, µs: 2048 tokens x 8 adapters 73 against 84 for 64-token tiles, x 64 adapters
    98 against 99, 512 x 8 22 against 26; 256 columns or 8 warps slower; bench/notes/kernels.md,
    session 9). Shorter segments take 16-token tiles (less padding)."""
    return {"block_t": max(DOT_TILE, min(32, pick_block_t(num_tokens, num_segs))), "block_n": 128, "block_r": 16,
            "num_warps": 4, "num_stages": 2}


def launch_config(num_tokens: int, num_segs: int, config: dict | None = None, max_rank: int | None = None) -> Mapping:
    """Every compile-time choice of a launch from host ints (as sgmv_expand.launch_config); `config`
    overrides block sizes and may give "block_g" and "rank_bound" (>= every slot's rank in the step,
    default max_rank, the pool's: ranks within one BLOCK_R step take the loop-free path in tiles of up
    to 32 tokens; "one_step" turns it on or off). Token tiles under 16 are ignored. Cached; read-only."""
    return _launch_config(num_tokens, num_segs, tuple(sorted((config or {}).items())), max_rank)


@functools.lru_cache(maxsize=1024)
def _launch_config(num_tokens: int, num_segs: int, config_items: tuple, max_rank: int | None) -> Mapping:
    config = dict(config_items)
    rank_bound = config.pop("rank_bound", None) or max_rank
    if (config.get("block_t") or DOT_TILE) < DOT_TILE:
        config.pop("block_t")                        # tl.dot needs >= 16 rows; a smaller tile only pads
    cfg = {**default_config(num_tokens, num_segs), **config}
    cfg["block_g"] = block_g_for(num_segs, config.get("block_g"))
    # a step's ranks in one BLOCK_R step (known only from the caller's bound): no rank loop. By default in
    # tiles of up to 32 tokens, where it was measured on the H200 (bench/results/dot-ab-h200.json): 256
    # tokens x 64 adapters 45.1 -> 41.4 µs, 64 x 8 8.05 -> 7.06, 2048 x 8 (32-token tiles) 74.9 -> 72.0
    cfg["one_step"] = (bool(config.get("one_step", cfg["block_t"] <= 32)) and rank_bound is not None
                       and rank_bound <= cfg["block_r"])
    if cfg["block_t"] < DOT_TILE or cfg["block_n"] < 16 or cfg["block_r"] not in (16, 64):
        # block_r 32 faults on the tl.dot path with triton 3.6 (kernels/sgmv_expand.default_config)
        raise ValueError(f"need block_t, block_n >= 16 and block_r 16 or 64: {cfg}")
    return MappingProxyType(cfg)


def lora_silu_mul(y: torch.Tensor, b_pool: torch.Tensor, gate_up: torch.Tensor, seg_indptr: torch.Tensor,
                  seg_slots: torch.Tensor, slot_ranks: torch.Tensor, slot_scales: torch.Tensor, *,
                  config: dict | None = None) -> torch.Tensor:
    """-> new out [T, I] = silu(gate') * up', gate_up' = gate_up + the gate/up LoRA (module docstring).

    y [T, 2, R] fp32 or B's dtype (the shrink's), b_pool [S, R, 2I] (gate columns, then up),
    gate_up [T, 2I] B's dtype (the base matmul's; not modified). All contiguous. No host-device
    sync; capturable in a CUDA graph."""
    check_device(y, b_pool, gate_up, seg_indptr, seg_slots, slot_ranks, slot_scales)
    if y.dim() != 3 or y.shape[1] != 2 or b_pool.dim() != 3 or gate_up.dim() != 2:
        raise ValueError(f"need y [T, 2, R], b_pool [S, R, 2I], gate_up [T, 2I]; got {tuple(y.shape)}, "
                         f"{tuple(b_pool.shape)}, {tuple(gate_up.shape)}")
    num_tokens, _, max_rank = y.shape
    num_slots, b_rank, two_inter = b_pool.shape
    if b_rank != max_rank or two_inter % 2 or tuple(gate_up.shape) != (num_tokens, two_inter):
        raise ValueError(f"shapes do not match: y {tuple(y.shape)}, b_pool {tuple(b_pool.shape)}, "
                         f"gate_up {tuple(gate_up.shape)}")
    if b_pool.dtype not in (torch.bfloat16, torch.float16, torch.float32) or gate_up.dtype != b_pool.dtype \
            or y.dtype not in (torch.float32, b_pool.dtype):
        raise ValueError(f"b_pool bf16/fp16/fp32, gate_up its dtype, y fp32 or its dtype: "
                         f"{b_pool.dtype}, {gate_up.dtype}, {y.dtype}")
    check_contiguous(y=y, b_pool=b_pool, gate_up=gate_up, slot_scales=slot_scales)
    num_segs = check_lora_meta(seg_indptr, seg_slots, slot_ranks, num_slots, slot_scales)
    inter = two_inter // 2
    out = gate_up.new_empty(num_tokens, inter)
    if num_tokens == 0:
        return out
    cfg = launch_config(num_tokens, num_segs, config, max_rank)
    grid = (num_tiles_bound(num_tokens, num_segs, cfg["block_t"]) * cdiv(inter, cfg["block_n"]),)
    _lora_silu_mul_kernel[grid](
        y, b_pool, gate_up, out, seg_indptr, seg_slots, slot_ranks, slot_scales,
        num_tokens, num_segs, inter, 2 * max_rank,
        R=max_rank, BLOCK_G=cfg["block_g"], BLOCK_T=cfg["block_t"], BLOCK_N=cfg["block_n"],
        BLOCK_R=cfg["block_r"], IEEE=(b_pool.dtype == torch.float32), ONE_STEP=cfg["one_step"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out
