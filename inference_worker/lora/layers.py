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
from kernels.tiles import fused_decode_enabled, fused_decode_fits


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, module_names: tuple[str, ...], out_sizes: tuple[int, ...],
                 ops: KernelOps) -> None:
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
        if lora.side_stream is not None and lora.overlap != "none":
            return self._forward_overlapped(x, lora)
        out = self.base_layer(x)
        if self._fused_decode and fused_decode_fits(lora.block_t, lora.rank_bound, self.in_features,
                                                    x.element_size()):
            self.ops.lora_decode(x, self.a_pool, self.b_pool, self.out_offsets, lora.seg_indptr, lora.seg_slots,
                                 lora.slot_ranks, lora.slot_scales, out, block_t=lora.block_t,
                                 rank_bound=lora.rank_bound)
            return out
        y = self._shrink(x, lora)
        return self._expand(y, lora, out)

    def _forward_overlapped(self, x: torch.Tensor, lora: LoraBatchMeta) -> torch.Tensor:
        """The LoRA work on lora.side_stream, beside the base matmul. In a decode step both are
        memory-bound streams of weights (the base's W, the step's adapters' A/B), and each kernel
        alone leaves bandwidth unused: the small LoRA launches spend much of their time on latency
        (bench/lora_overlap.py). "shrink": y = x A^T beside the matmul, the expand after it (it adds
        into the matmul's output). "full": shrink and expand into a zeroed scratch beside the
        matmul, added to its output after (one more small kernel; the LoRA delta is rounded to
        the model dtype once before the add, as PEFT adds it)."""
        main, side = torch.cuda.current_stream(), lora.side_stream
        full = lora.overlap == "full"
        # allocated on the main stream: its memory is reused only after the join below
        delta = x.new_empty((x.shape[0], self.out_offsets[-1])) if full else None
        side.wait_stream(main)                            # x is ready
        with torch.cuda.stream(side):
            y = self._shrink(x, lora)
            if full:
                self._expand(y, lora, delta.zero_())
        out = self.base_layer(x)
        main.wait_stream(side)
        return out.add_(delta) if full else self._expand(y, lora, out)

    def _shrink(self, x: torch.Tensor, lora: LoraBatchMeta) -> torch.Tensor:
        num_modules, max_rank = self.a_pool.shape[1], self.a_pool.shape[2]
        # fp32 intermediate: the Triton shrink needs it for split-K, and it keeps precision in bf16
        y = self.shrink_scratch[: x.shape[0] * num_modules * max_rank].view(x.shape[0], num_modules, max_rank)
        # the step's fixed launch choices (a decode graph's token tile and rank bound; an eager
        # step's segment-table width, inference_worker/lora/warmup.py)
        self.ops.sgmv_shrink(x, self.a_pool, lora.seg_indptr, lora.seg_slots, lora.slot_ranks, y,
                             config=lora.sgmv_config)
        return y

    def _expand(self, y: torch.Tensor, lora: LoraBatchMeta, out: torch.Tensor) -> torch.Tensor:
        self.ops.sgmv_expand(y, self.b_pool, self.out_offsets, lora.seg_indptr, lora.seg_slots,
                             lora.slot_ranks, lora.slot_scales, out, config=lora.sgmv_config)
        return out
