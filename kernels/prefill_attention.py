"""Prefill attention: causal attention within each packed sequence (varlen).

Math (reference: kernels.reference.prefill_attention_ref):
    out[s:e, h] = softmax(scale * q[s:e, h] @ k[s:e, h // (Hq/Hkv)]ᵀ + causal mask) @ v[s:e, ...]
    for every sequence [s, e) of cu_seqlens; q [T, Hq, D], k/v [T, Hkv, D].

One launch for the whole packed batch when a varlen kernel is there (fp16/bf16 on CUDA):
flash-attn's `flash_attn_varlen_func` when it is importable, else PyTorch's own
`torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10; GQA native, causal as the window
(-1, 0); checked against per-sequence SDPA on an H200 with torch 2.11: bf16 max error 0.004).
Otherwise PyTorch SDPA per sequence (4-D, so its fused kernels apply): a 2,048-token prompt
step of 7 sequences ran ~900 small launches that way (SDPA + copy + memset per sequence and
layer, bench/results/profile-step-h200.md). Prefill is not captured in CUDA graphs: the SDPA
path reads cu_seqlens on the host (pass `seq_bounds` to avoid that sync), the varlen kernels
need max_seqlen (pass `max_seqlen`, else it is read from the device).
"""
from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional dependency
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_varlen_func = None
try:  # PyTorch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except Exception:  # noqa: BLE001
    torch_varlen_attn = None
_torch_varlen_failed = False          # set when it refused a call: SDPA from then on


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"need q [T, Hq, D], k/v [T, Hkv, D] with Hkv | Hq; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be [B+1] int32, got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float, *, max_seqlen: int | None = None,
                      seq_bounds: list[int] | None = None) -> torch.Tensor:
    """Returns out [T, Hq, D] (q's dtype). seq_bounds: cu_seqlens as host ints, if known."""
    global _torch_varlen_failed
    _check(q, k, v, cu_seqlens)
    if _varlen_applies(q) and (flash_attn_varlen_func is not None or
                               (torch_varlen_attn is not None and not _torch_varlen_failed)):
        if max_seqlen is None and seq_bounds is not None:
            max_seqlen = max((e - s for s, e in itertools.pairwise(seq_bounds)), default=0)
        elif max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                          softmax_scale=scale, causal=True)
        try:
            return torch_varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                                     window_size=(-1, 0))
        except (RuntimeError, ValueError, TypeError) as exc:   # a head size, GPU or torch it does not support
            _torch_varlen_failed = True
            log.warning("torch varlen attention unavailable (%s); prefill uses SDPA per sequence", exc)
    return _sdpa_per_sequence(q, k, v, cu_seqlens, scale, seq_bounds)


def _varlen_applies(q: torch.Tensor) -> bool:
    """The varlen kernels take fp16/bf16 on CUDA only."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _sdpa_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                       scale: float, seq_bounds: list[int] | None) -> torch.Tensor:
    bounds = seq_bounds if seq_bounds is not None else cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for s, e in itertools.pairwise(bounds):
        if e == s:
            continue
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))      # [1, H, n, D]
        # 4-D inputs: SDPA's fused (flash / memory-efficient) kernels take only 4-D tensors, 3-D
        # ones fall back to the unfused math path (~a dozen kernels and an n x n matrix per head).
        # enable_gqa: SDPA maps query heads to KV heads itself (no repeated K/V copies).
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=gqa)[0].transpose(0, 1)
    return out
