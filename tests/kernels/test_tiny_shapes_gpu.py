"""Every op at the tiny test model's shapes (head_dim 16, 2 KV heads, hidden 64, fused
q/k/v of 64+32+32 columns) in bf16/fp16 on the GPU, one op at a time with a sync after
each, against the references: small shapes exercise alignment and masking paths that
Llama-3-8B sizes never reach."""
from __future__ import annotations

import pytest
import torch

from kernels import reference
from tests.kernels.helpers import make_meta, make_pools, rel_err

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
TOL = 2e-2


@pytest.fixture(scope="module")
def ops():
    from kernels.triton_ops import TRITON_OPS
    return TRITON_OPS


# (name, M, H_in, out_offsets): the tiny model's four LoRA groups
GROUPS = [("qkv", 3, 64, (0, 64, 96, 128)), ("o", 1, 64, (0, 64)),
          ("gate_up", 2, 64, (0, 128, 256)), ("down", 1, 128, (0, 64))]


@pytest.mark.parametrize("max_rank", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS, ids=[g[0] for g in GROUPS])
@pytest.mark.parametrize("seg_lens,seg_slots", [([41, 1, 1], [0, -1, 1]), ([1] * 9, [0, 1, -1, 2, 3, 4, 5, 6, 7]),
                                                ([5, 3], [1, 0])])
def test_sgmv_tiny(ops, dtype, group, seg_lens, seg_slots, max_rank):
    _, num_mods, h_in, offsets = group
    torch.manual_seed(len(seg_lens) * 7 + num_mods)
    dev = "cuda"
    indptr, slots, num_tokens = make_meta(seg_lens, seg_slots, dev)
    ranks = [min(r, max_rank) for r in (4, 32, 8, 16, 64, 1, 2, 64)]
    a, b, slot_ranks, slot_scales = make_pools(8, num_mods, max_rank, h_in, offsets[-1], ranks, dtype, dev)
    x = torch.randn(num_tokens, h_in, device=dev).to(dtype)
    y = torch.full((num_tokens, num_mods, max_rank), float("nan"), device=dev)
    ops.sgmv_shrink(x, a, indptr, slots, slot_ranks, y)
    torch.cuda.synchronize()
    y_ref = reference.sgmv_shrink_ref(x, a, indptr, slots, slot_ranks, torch.empty_like(y))
    assert rel_err(y, y_ref) < TOL
    base = torch.randn(num_tokens, offsets[-1], device=dev).to(dtype)
    out = base.clone()
    ops.sgmv_expand(y_ref, b, offsets, indptr, slots, slot_ranks, slot_scales, out)
    torch.cuda.synchronize()
    out_ref = reference.sgmv_expand_ref(y_ref, b, offsets, indptr, slots, slot_ranks, slot_scales, base.clone())
    assert rel_err(out, out_ref) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_tiny(ops, dtype):
    torch.manual_seed(0)
    dev, heads, kv_heads, head_dim, block = "cuda", 4, 2, 16, 16
    lens = [1, 17, 40, 3]
    num_blocks = 32
    k_cache = torch.randn(num_blocks, block, kv_heads, head_dim, device=dev).to(dtype)
    v_cache = torch.randn_like(k_cache)
    # KV write of T new tokens into scattered slots
    num_new = 7
    k_new = torch.randn(num_new, kv_heads, head_dim, device=dev).to(dtype)
    v_new = torch.randn_like(k_new)
    slot_mapping = torch.randperm(num_blocks * block, device=dev)[:num_new].to(torch.int64)
    kc, vc = k_cache.clone(), v_cache.clone()
    ops.write_kv_cache(k_new, v_new, kc, vc, slot_mapping)
    torch.cuda.synchronize()
    kr, vr = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache_ref(k_new, v_new, kr, vr, slot_mapping)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    # paged decode
    tables = torch.randperm(num_blocks, device=dev)[: len(lens) * 4].view(len(lens), 4).to(torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(len(lens), heads, head_dim, device=dev).to(dtype)
    out = ops.paged_attention_decode(q, k_cache, v_cache, tables, ctx, head_dim ** -0.5)
    torch.cuda.synchronize()
    ref = reference.paged_attention_decode_ref(q, k_cache, v_cache, tables, ctx, head_dim ** -0.5)
    assert rel_err(out, ref) < TOL
    # prefill over packed sequences
    cu = torch.tensor([0, 5, 6, 30], dtype=torch.int32, device=dev)
    qp = torch.randn(30, heads, head_dim, device=dev).to(dtype)
    kp = torch.randn(30, kv_heads, head_dim, device=dev).to(dtype)
    vp = torch.randn_like(kp)
    out = ops.prefill_attention(qp, kp, vp, cu, head_dim ** -0.5)
    torch.cuda.synchronize()
    assert rel_err(out, reference.prefill_attention_ref(qp, kp, vp, cu, head_dim ** -0.5)) < TOL
