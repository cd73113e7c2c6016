"""RMSNorm, alone or fused with the residual add before it.

Math (references: kernels.reference.rms_norm_ref, add_rms_norm_ref), for each row t:
    add_rms_norm only:  residual[t] = round(residual[t] + x[t])   (in place), x[t] := residual[t]
    out[t] = round(weight * round(x[t] * rsqrt(mean(x[t]^2) + eps)))
computed in fp32 with the two roundings (to x's dtype) of transformers' LlamaRMSNorm, whose
weight * h is a product in the model dtype. x, residual, out [T, H]; weight [H].

One program per row, the whole row in one block (BLOCK = next_power_of_2(H), fine for
H <= 16384): the add, the sum of squares and the scaling never leave registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_contiguous, check_device
from kernels.tiles import next_pow2

_MAX_H = 16384


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, H, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * H
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # rounded to the dtype before the norm reads it, as `residual = residual + x` in torch
        x = (tl.load(res_ptr + row + offs, mask=mask, other=0.0).to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row + offs, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(h * h, 0) / H + eps)
    normed = (h * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            num_warps: int | None) -> torch.Tensor:
    tensors = (x, weight) if residual is None else (x, residual, weight)
    check_device(*tensors)
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"need x [T, H] and weight [H]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    if any(t.dtype != x.dtype for t in tensors) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x, residual and weight must share one float dtype: {[t.dtype for t in tensors]}")
    if x.shape[1] > _MAX_H:
        raise ValueError(f"hidden size {x.shape[1]} > {_MAX_H}: one row must fit one block")
    check_contiguous(x=x, weight=weight, **({} if residual is None else {"residual": residual}))
    out = torch.empty_like(x)
    num_rows, hidden = x.shape
    if num_rows == 0:
        return out
    block = next_pow2(hidden)
    warps = num_warps or min(16, max(1, block // 512))       # ~16 elements a thread
    _rms_norm_kernel[(num_rows,)](x, x if residual is None else residual, weight, out, hidden, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, num_warps: int | None = None) -> torch.Tensor:
    """x [T, H], weight [H] (same float dtype, contiguous) -> new out [T, H]."""
    return _launch(x, None, weight, eps, num_warps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 num_warps: int | None = None) -> torch.Tensor:
    """residual += x in place, then -> new rms_norm(residual) [T, H]; x, residual [T, H], weight [H]."""
    return _launch(x, residual, weight, eps, num_warps)
