"""Paged attention of one layer over a mixed prefill + decode step.

A step's tokens are laid out [prefill tokens of every prefill sequence | one token per
decode sequence]. Prefill sequences always start at position 0 (no chunked prefill,
no prefix cache: a preempted sequence is recomputed whole), so their queries attend
only to their own new tokens; decode queries attend to the paged cache. All math goes
through the kernel ops (`kernels.backend.get_ops`) so Triton kernels replace the
references on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.backend import KernelOps


@dataclass
class AttentionMeta:
    """Per-step attention inputs, shared by every layer (views of static buffers)."""

    num_prefill_tokens: int               # Tp: tokens [0, Tp) are prefill, [Tp, T) decode
    num_decodes: int                      # D: decode sequences, one token each
    slot_mapping: torch.Tensor            # [T] int64 block * block_size + offset, where each new K/V goes
    cu_seqlens: torch.Tensor              # [P+1] int32 prefill sequence bounds in [0, Tp)
    block_tables: torch.Tensor            # [D, max_blocks_per_seq] int32 decode sequences' blocks
    context_lens: torch.Tensor            # [D] int32 cached tokens of each decode sequence, new one included
    # cu_seqlens as host ints and the longest prefill (the runner knows them): prefill attention
    # then needs no host sync; None = read cu_seqlens back
    prefill_bounds: list[int] | None = None
    prefill_max_len: int = 0


class PagedAttention:
    """Writes the step's K/V into the layer's cache and attends (GQA).

    `attend` alone when the K/V are already in the cache (the model's fused rope_and_cache op).
    """

    def __init__(self, ops: KernelOps, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], caches [num_blocks, block_size, Hkv, D] -> [T, Hq, D]."""
        self.ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k, v, k_cache, v_cache, meta)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        """As __call__, with this step's k, v already written into the caches at meta.slot_mapping:
        prefill queries read k, v, decode queries the caches. `out` [T, Hq, D]: written and
        returned (a prompt graph's static buffer)."""
        num_prefill = meta.num_prefill_tokens
        # host-known bounds: reading cu_seqlens back would sync every layer (the GPU then idles
        # while the host launches the rest of the layer)
        hints = {} if meta.prefill_bounds is None else {"seq_bounds": meta.prefill_bounds,
                                                        "max_seqlen": meta.prefill_max_len}
        if out is None and (meta.num_decodes == 0 or num_prefill == 0):
            if meta.num_decodes == 0:
                return self.ops.prefill_attention(q, k, v, meta.cu_seqlens, self.scale, **hints)
            return self.ops.paged_attention_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                   self.scale)
        out = torch.empty_like(q) if out is None else out
        if num_prefill:
            out[:num_prefill] = self.ops.prefill_attention(q[:num_prefill], k[:num_prefill], v[:num_prefill],
                                                           meta.cu_seqlens, self.scale, **hints)
        if meta.num_decodes:
            out[num_prefill:] = self.ops.paged_attention_decode(q[num_prefill:], k_cache, v_cache,
                                                                meta.block_tables, meta.context_lens, self.scale)
        return out
