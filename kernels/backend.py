"""One place that picks the kernel implementation for a device.

Engine code calls `ops = get_ops(device)` once at start and then only `ops.*`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import reference


@dataclass(frozen=True)
class KernelOps:
    name: str
    sgmv_shrink: Callable
    sgmv_expand: Callable
    write_kv_cache: Callable
    paged_attention_decode: Callable
    prefill_attention: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    rope_and_cache: Callable
    silu_and_mul: Callable
    lora_decode: Callable               # shrink + expand in one launch (decode; experimental)
    lora_silu_mul: Callable             # the gate/up expand inside the activation (prompt steps)


REFERENCE_OPS = KernelOps(
    name="reference",
    sgmv_shrink=reference.sgmv_shrink_ref,
    sgmv_expand=reference.sgmv_expand_ref,
    write_kv_cache=reference.write_kv_cache_ref,
    paged_attention_decode=reference.paged_attention_decode_ref,
    prefill_attention=reference.prefill_attention_ref,
    rms_norm=reference.rms_norm_ref,
    add_rms_norm=reference.add_rms_norm_ref,
    rope_and_cache=reference.rope_and_cache_ref,
    silu_and_mul=reference.silu_and_mul_ref,
    lora_decode=reference.lora_decode_ref,
    lora_silu_mul=reference.lora_silu_mul_ref,
)


def get_ops(device: torch.device | str) -> KernelOps:
    """Triton kernels on CUDA (unless OPENLORA_KERNELS=reference), references elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("OPENLORA_KERNELS") == "reference":
        return REFERENCE_OPS
    from kernels import triton_ops  # imported lazily: triton is only needed on GPUs

    return triton_ops.TRITON_OPS
