"""A linear layer with multi-LoRA: base_layer(x) plus each token's adapter, added in place.

One LoRALinear may stand for several fused projections sharing an input (q/k/v,
gate/up): module m of the adapter writes columns out_offsets[m]:out_offsets[m+1].
The slot pool attaches the device A/B pools once at start; the per-step mapping
of tokens to slots comes in a LoraBatchMeta.
"""
from __future__ import annotations

import torch
from torch import nn

from inference_worker.lora.metadata import LoraBatchMeta
from kernels.backend import KernelOps
from kernels.tiles import DOT_TILE, fused_decode_enabled, fused_decode_fits


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, module_names: tuple[str, ...], out_sizes: tuple[int, ...],
                 ops: KernelOps, *, silu_mul: bool = False) -> None:
        super().__init__()
        if sum(out_sizes) != base_layer.out_features or len(out_sizes) != len(module_names):
            raise ValueError(f"out_sizes {out_sizes} do not split {base_layer.out_features} over {module_names}")
        self.base_layer = base_layer
        self.module_names = module_names                  # PEFT names, in column order
        offsets = [0]
        for size in out_sizes:
            offsets.append(offsets[-1] + size)
        self.out_offsets = tuple(offsets)                 # [M+1] column bounds of each module
        self.ops = ops
        # a fused gate/up whose model calls forward_silu_mul (the kernel warm-up compiles for that)
        self.silu_mul = silu_mul
        self._fused_decode = fused_decode_enabled()      # experimental (kernels/lora_decode.py)
        # Attached by SlotPool.attach (plain attributes: not weights of the model).
        self.a_pool: torch.Tensor | None = None           # [S, M, R, in]
        self.b_pool: torch.Tensor | None = None           # [S, R, N] (rank-major), N = out_features
        self.shrink_scratch: torch.Tensor | None = None   # [max_tokens * M_max * R] float32, shared

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    def forward(self, x: torch.Tensor, lora: LoraBatchMeta) -> torch.Tensor:
        """x [T, in] -> [T, out]: base + scale[slot] * B[slot] A[slot] x per token."""
        if not lora.has_lora or self.a_pool is None:
            return self.base_layer(x)
        if self._fused_decode and fused_decode_fits(lora.block_t, lora.rank_bound, self.in_features,
                                                    x.element_size()):
            out = self.base_layer(x)
            self.ops.lora_decode(x, self.a_pool, self.b_pool, self.out_offsets, lora.seg_indptr, lora.seg_slots,
                                 lora.slot_ranks, lora.slot_scales, out, block_t=lora.block_t,
                                 rank_bound=lora.rank_bound)
            return out
        out, y = self._base_and_shrink(x, lora)
        return self._expand(y, lora, out)

    def forward_silu_mul(self, x: torch.Tensor, lora: LoraBatchMeta) -> torch.Tensor:
        """For a fused gate/up projection: x [T, in] -> silu(gate) * up [T, out / 2], each token's
        adapter included. Steps of long token tiles (prompts: >= DOT_TILE tokens a tile, or the
        kernels' pick in eager steps) add the gate/up delta inside the activation (kernels/lora_silu_mul.py:
        the LoRA then makes no pass over the [T, 2I] output); decode tiles keep the expand tuned for
        them, then the activation."""
        if not lora.has_lora or self.a_pool is None or (lora.block_t is not None and lora.block_t < DOT_TILE):
            return self.ops.silu_and_mul(self.forward(x, lora))
        gate_up, y = self._base_and_shrink(x, lora)
        return self.ops.lora_silu_mul(y, self.b_pool, gate_up, lora.seg_indptr, lora.seg_slots, lora.slot_ranks,
                                      lora.slot_scales, config=lora.sgmv_config)

    def _base_and_shrink(self, x: torch.Tensor, lora: LoraBatchMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the base matmul's output, the shrink's y). With lora.side_stream, the shrink runs on it
        beside the base matmul. Both stream weights from memory; the shrink's small programs spend
        much of their time on latency, which the matmul beside them hides. H200, one Llama-3-8B decode
        layer at 64 tokens (bench/results/lora-overlap-h200.md): the LoRA 77 -> 72 µs (S100) and
        147 -> 136 µs (S1000). Running the expand on the side stream too (into a scratch added
        after) lost: 82 and 144 µs."""
        if lora.side_stream is None:
            return self.base_layer(x), self._shrink(x, lora)
        return run_beside(lora.side_stream, lambda: self._shrink(x, lora), lambda: self.base_layer(x))

    def _shrink(self, x: torch.Tensor, lora: LoraBatchMeta) -> torch.Tensor:
        num_modules, max_rank = self.a_pool.shape[1], self.a_pool.shape[2]
        # fp32 intermediate: the Triton shrink needs it for split-K, and it keeps precision in bf16
        y = self.shrink_scratch[: x.shape[0] * num_modules * max_rank].view(x.shape[0], num_modules, max_rank)
        # the step's fixed launch choices (a decode graph's token tile and rank bound; an eager
        # step's segment-table width, inference_worker/lora/warmup.py)
        self.ops.sgmv_shrink(x, self.a_pool, lora.seg_indptr, lora.seg_slots, lora.slot_ranks, y,
                             config=lora.shrink_config_for(x.shape[0], x.shape[1]))
        return y

    def _expand(self, y: torch.Tensor, lora: LoraBatchMeta, out: torch.Tensor) -> torch.Tensor:
        self.ops.sgmv_expand(y, self.b_pool, self.out_offsets, lora.seg_indptr, lora.seg_slots,
                             lora.slot_ranks, lora.slot_scales, out, config=lora.sgmv_config)
        return out


def run_beside(side: torch.cuda.Stream, side_fn, main_fn):
    """side_fn() on stream `side` beside main_fn() on the current stream (both may read what the
    current stream has written so far); the current stream then waits for both. -> (main_fn's result,
    side_fn's result). In a CUDA graph capture the two become parallel branches."""
    main = torch.cuda.current_stream(side.device)
    side.wait_stream(main)                                # their inputs are ready
    with torch.cuda.stream(side):
        side_out = side_fn()
    main_out = main_fn()
    main.wait_stream(side)
    return main_out, side_out
