"""PyTorch references of every kernel: the CPU backend and the ground truth of tests.

Conventions shared by all LoRA kernels (see kernels/__init__.py):
  tokens are sorted into segments, one segment per adapter slot in the step;
  seg_indptr [G+1] int32  token range of segment g is seg_indptr[g]:seg_indptr[g+1]
  seg_slots  [G]   int32  slot of segment g, -1 = base model (no LoRA)
  slot_ranks [S]   int32  true rank of each slot (<= R, the pool's max rank)
  slot_scales[S]   fp32   lora_alpha / r (or alpha / sqrt(r) for rsLoRA)
"""
from __future__ import annotations

import itertools
import math

import torch


def _segments(seg_indptr: torch.Tensor, seg_slots: torch.Tensor):
    bounds = seg_indptr.tolist()
    for g, slot in enumerate(seg_slots.tolist()):
        start, end = bounds[g], bounds[g + 1]
        if slot >= 0 and end > start:
            yield start, end, slot


def sgmv_shrink_ref(x: torch.Tensor, a_pool: torch.Tensor, seg_indptr: torch.Tensor,
                    seg_slots: torch.Tensor, slot_ranks: torch.Tensor, out: torch.Tensor, *,
                    config: dict | None = None) -> torch.Tensor:
    """out[t, m, :r] = x[t] @ a_pool[slot(t), m, :r]ᵀ; out[t, m, r:] = 0; base tokens -> 0.

    x [T, H_in], a_pool [S, M, R, H_in], out [T, M, R] (overwritten).
    M > 1 stacks modules that share an input (q/k/v, gate/up). config: the Triton
    launcher's tuning (ignored here).
    """
    out.zero_()
    for start, end, slot in _segments(seg_indptr, seg_slots):
        r = int(slot_ranks[slot])
        a = a_pool[slot, :, :r, :].float()                         # [M, r, H_in]
        y = torch.einsum("th,mrh->tmr", x[start:end].float(), a)   # [t, M, r]
        out[start:end, :, :r] = y.to(out.dtype)
    return out


def sgmv_expand_ref(y: torch.Tensor, b_pool: torch.Tensor, out_offsets: tuple[int, ...],
                    seg_indptr: torch.Tensor, seg_slots: torch.Tensor, slot_ranks: torch.Tensor,
                    slot_scales: torch.Tensor, out: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """out[t, off_m:off_m+1] += scale[slot] * y[t, m, :r] @ b_pool[slot, :r, off_m:off_m+1].

    y [T, M, R], b_pool [S, R, N] (rank-major) with N = out_offsets[-1], out [T, N] (added in place).
    config: the Triton launcher's tuning (ignored here).
    """
    for start, end, slot in _segments(seg_indptr, seg_slots):
        r = int(slot_ranks[slot])
        scale = float(slot_scales[slot])
        for m in range(len(out_offsets) - 1):
            lo, hi = out_offsets[m], out_offsets[m + 1]
            delta = y[start:end, m, :r].float() @ b_pool[slot, :r, lo:hi].float()
            out[start:end, lo:hi] += (scale * delta).to(out.dtype)
    return out


def lora_decode_ref(x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor, out_offsets: tuple[int, ...],
                    seg_indptr: torch.Tensor, seg_slots: torch.Tensor, slot_ranks: torch.Tensor,
                    slot_scales: torch.Tensor, out: torch.Tensor, *, block_t: int | None = None,
                    rank_bound: int | None = None, config: dict | None = None) -> torch.Tensor:
    """out += LoRA(x): sgmv_shrink_ref then sgmv_expand_ref (y in fp32). The fused Triton kernel's
    reference (kernels/lora_decode.py); block_t, rank_bound and config are its tuning (ignored)."""
    y = torch.empty(x.shape[0], a_pool.shape[1], a_pool.shape[2], dtype=torch.float32, device=x.device)
    sgmv_shrink_ref(x, a_pool, seg_indptr, seg_slots, slot_ranks, y)
    return sgmv_expand_ref(y, b_pool, out_offsets, seg_indptr, seg_slots, slot_ranks, slot_scales, out)


def lora_silu_mul_ref(y: torch.Tensor, b_pool: torch.Tensor, gate_up: torch.Tensor, seg_indptr: torch.Tensor,
                      seg_slots: torch.Tensor, slot_ranks: torch.Tensor, slot_scales: torch.Tensor, *,
                      config: dict | None = None) -> torch.Tensor:
    """silu_and_mul of gate_up plus its gate/up LoRA (y [T, 2, R], b_pool [S, R, 2I]; gate_up not
    modified): sgmv_expand_ref into a copy, then silu_and_mul_ref (kernels/lora_silu_mul.py fuses them)."""
    inter = gate_up.shape[1] // 2
    added = sgmv_expand_ref(y, b_pool, (0, inter, 2 * inter), seg_indptr, seg_slots, slot_ranks, slot_scales,
                            gate_up.clone())
    return silu_and_mul_ref(added)


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values into the paged cache.

    k, v [T, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D];
    slot_mapping [T] int64: block * block_size + offset (negative = skip, e.g. padding).
    """
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    idx = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[idx] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[idx] = v[keep].to(v_cache.dtype)
    del block_size


def paged_attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """One query token per sequence attends to its whole cached context (causal by construction).

    q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    context_lens [B] int32 (tokens in the cache, the new one included). Returns [B, Hq, D].
    Grouped-query: head h reads kv head h // (Hq // Hkv).
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i in range(num_seqs):
        n = int(context_lens[i])
        blocks = block_tables[i, : math.ceil(n / block_size)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()   # [n, Hkv, D]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        k = k.repeat_interleave(group, dim=1)                                # [n, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          scale: float, *, max_seqlen: int | None = None,
                          seq_bounds: list[int] | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence (varlen).

    q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1] int32. Returns [T, Hq, D].
    """
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = seq_bounds if seq_bounds is not None else cu_seqlens.tolist()   # max_seqlen: unused here
    for s, e in itertools.pairwise(bounds):
        if e == s:
            continue
        qs = q[s:e].transpose(0, 1)                                 # [Hq, n, D]
        ks = k[s:e].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[s:e].repeat_interleave(group, dim=1).transpose(0, 1)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in fp32, round to x's dtype, times weight in the dtype.

    x [T, H], weight [H]. Returns a new [T, H] tensor.
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place, rounded to its dtype), then returns rms_norm_ref(residual)."""
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps)


def rotate_half_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rope, rotate-half (NeoX) convention, in x's dtype. x [T, H, D], cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_and_cache_ref(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       num_heads: int, num_kv_heads: int, head_dim: int,
                       out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection, rotate q and k, write k and v into the paged cache.

    qkv [T, (Hq + 2 Hkv) * D]; positions [T]; cos/sin [max_len, D] tables; caches and
    slot_mapping as write_kv_cache_ref. Returns new contiguous q [T, Hq, D], k, v [T, Hkv, D],
    or copies them into `out`'s and returns those.
    """
    q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
    cos, sin = cos[positions][:, None, :], sin[positions][:, None, :]          # [T, 1, D]
    q = rotate_half_ref(qkv[:, :q_out].view(-1, num_heads, head_dim), cos, sin)
    k = rotate_half_ref(qkv[:, q_out:q_out + kv_out].view(-1, num_kv_heads, head_dim), cos, sin)
    v = qkv[:, q_out + kv_out:].view(-1, num_kv_heads, head_dim).contiguous()
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
    if out is not None:
        return tuple(dst.copy_(src) for dst, src in zip(out, (q, k, v)))
    return q, k, v


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up [T, I], each op rounded to the dtype (as transformers)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
