"""SiLU-and-multiply of the fused gate/up projection (the Llama MLP's activation).

Math (reference: kernels.reference.silu_and_mul_ref), gate_up [T, 2I] = [gate | up]:
    out[t, i] = round(round(silu(gate[t, i])) * up[t, i]),  silu(g) = g / (1 + exp(-g))
in fp32 with the two roundings to the dtype of transformers' `act_fn(gate) * up`.

Grid (T, cdiv(I, BLOCK)): one program per token and column block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_contiguous, check_device
from kernels.tiles import cdiv, next_pow2


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, INTER, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(x_ptr + t * 2 * INTER + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * 2 * INTER + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * INTER + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (contiguous, bf16/fp16/fp32) -> new out [T, I] = silu(gate) * up."""
    check_device(gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"need gate_up [T, 2I]; got {tuple(gate_up.shape)}")
    if gate_up.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"gate_up dtype must be bf16, fp16 or fp32, got {gate_up.dtype}")
    check_contiguous(gate_up=gate_up)
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(num_tokens, inter)
    if num_tokens == 0 or inter == 0:
        return out
    block = block or min(1024, next_pow2(inter))
    _silu_mul_kernel[(num_tokens, cdiv(inter, block))](gate_up, out, inter, BLOCK=block,
                                                             num_warps=max(1, min(4, block // 256)))
    return out
