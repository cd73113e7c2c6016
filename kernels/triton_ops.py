"""The Triton kernel set (CUDA, or CPU under TRITON_INTERPRET=1): one launcher per file.

Each op has the signature of its reference in kernels/reference.py (launchers take
extra keyword-only tuning arguments, all optional).
"""
from __future__ import annotations

from kernels.activation import silu_and_mul
from kernels.backend import KernelOps
from kernels.kv_cache import write_kv_cache
from kernels.lora_decode import lora_decode
from kernels.lora_silu_mul import lora_silu_mul
from kernels.paged_attention import paged_attention_decode
from kernels.prefill_attention import prefill_attention
from kernels.rms_norm import add_rms_norm, rms_norm
from kernels.rope import rope_and_cache
from kernels.sgmv_expand import sgmv_expand
from kernels.sgmv_shrink import sgmv_shrink

TRITON_OPS = KernelOps(
    name="triton",
    sgmv_shrink=sgmv_shrink,
    sgmv_expand=sgmv_expand,
    write_kv_cache=write_kv_cache,
    paged_attention_decode=paged_attention_decode,
    prefill_attention=prefill_attention,
    rms_norm=rms_norm,
    add_rms_norm=add_rms_norm,
    rope_and_cache=rope_and_cache,
    silu_and_mul=silu_and_mul,
    lora_decode=lora_decode,
    lora_silu_mul=lora_silu_mul,
)
