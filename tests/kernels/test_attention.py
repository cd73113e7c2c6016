"""Paged decode attention, KV-cache write and prefill attention against the references."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import kernels.prefill_attention as prefill_module
from kernels.kv_cache import write_kv_cache
from kernels.paged_attention import paged_attention_decode
from kernels.prefill_attention import prefill_attention
from kernels.reference import paged_attention_decode_ref, prefill_attention_ref, write_kv_cache_ref
from tests.kernels.helpers import rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _paged_case(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, gen, spare_blocks=3):
    """Random caches with each sequence's blocks scattered over the pool (block tables shuffled)."""
    max_blocks = max(math.ceil(n / block_size) for n in context_lens) + spare_blocks
    num_blocks = len(context_lens) * max_blocks + 2
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    perm = torch.randperm(num_blocks, generator=gen)[: len(context_lens) * max_blocks]
    block_tables = perm.view(len(context_lens), max_blocks).to(torch.int32).to(device)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(dtype).to(device)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, block_tables, lens


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,partition", [
    (4, 4, 64, 16, None),        # MHA, one partition
    (8, 2, 128, 16, 32),         # GQA 4, split into partitions + reduce
    (6, 1, 64, 4, 16),           # GQA 6 (not a power of two), small blocks, many partitions
    (4, 2, 64, 32, 64),          # big blocks
])
def test_paged_attention_decode(heads, kv_heads, head_dim, block_size, partition):
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    context_lens = [1, 17, 70, 33, 16]
    q, kc, vc, bt, lens = _paged_case(context_lens, heads, kv_heads, head_dim, block_size, torch.float32, DEV, gen)
    scale = head_dim ** -0.5
    out = paged_attention_decode(q, kc, vc, bt, lens, scale, partition=partition)
    ref = paged_attention_decode_ref(q.double(), kc.double(), vc.double(), bt, lens, scale)
    assert rel_err(out, ref) < 1e-4


def test_paged_attention_zero_length_sequence_gives_zeros():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    q, kc, vc, bt, lens = _paged_case([5, 0, 9], 4, 2, 64, 16, torch.float32, DEV, gen)
    for partition in (None, 16):
        out = paged_attention_decode(q, kc, vc, bt, lens, 0.125, partition=partition)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        keep = torch.tensor([0, 2], device=DEV)
        ref = paged_attention_decode_ref(q[keep], kc, vc, bt[keep], lens[keep], 0.125)
        assert rel_err(out[keep], ref) < 1e-4


def test_paged_attention_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    q, kc, vc, bt, lens = _paged_case([5], 4, 2, 64, 16, torch.float32, DEV, gen)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode(q, kc, vc, bt.long(), lens, 0.1)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention_decode(q.double(), kc, vc, bt, lens, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_decode(torch.randn(1, 3, 64, device=DEV), kc, vc, bt, lens, 0.1)


def test_write_kv_cache():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    num_blocks, block_size, kv_heads, head_dim, tokens = 6, 4, 2, 24, 9
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(DEV)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(DEV)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 5]] = -1                                       # padding tokens: skipped
    slots = slots.to(DEV)
    kc = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), device=DEV)
    vc = torch.full_like(kc, float("nan"))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write_kv_cache(k, v, kc, vc, slots)
    write_kv_cache_ref(k, v, kc_ref, vc_ref, slots)
    torch.testing.assert_close(kc, kc_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc_ref, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_prefill_attention(heads, kv_heads):
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    lens = [5, 0, 12, 1]
    cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEV)
    tokens = sum(lens)
    q = torch.randn(tokens, heads, 32, generator=gen).to(DEV)
    k = torch.randn(tokens, kv_heads, 32, generator=gen).to(DEV)
    v = torch.randn(tokens, kv_heads, 32, generator=gen).to(DEV)
    out = prefill_attention(q, k, v, cu, 0.2)
    ref = prefill_attention_ref(q.double(), k.double(), v.double(), cu, 0.2)
    assert rel_err(out, ref) < 1e-4
    assert rel_err(prefill_attention(q, k, v, cu, 0.2, seq_bounds=cu.tolist()), ref) < 1e-4


def test_backend_picks_reference_on_cpu_and_triton_ops_match_signatures():
    import dataclasses
    import inspect

    from kernels import reference
    from kernels.backend import REFERENCE_OPS, KernelOps, get_ops
    from kernels.triton_ops import TRITON_OPS

    assert get_ops("cpu").name == "reference"
    ops = [f.name for f in dataclasses.fields(KernelOps) if f.name != "name"]
    assert {"rms_norm", "add_rms_norm", "rope_and_cache", "silu_and_mul"} <= set(ops)
    for op in ops:
        assert getattr(REFERENCE_OPS, op) is getattr(reference, op + "_ref"), op
        ours = inspect.signature(getattr(TRITON_OPS, op)).parameters.values()
        ref = inspect.signature(getattr(reference, op + "_ref")).parameters.values()
        positional = [[p.name for p in params if p.kind is not p.KEYWORD_ONLY] for params in (ours, ref)]
        assert positional[0] == positional[1], op
        # the engine may pass the reference's keyword hints to either op set
        assert {p.name for p in ref if p.kind is p.KEYWORD_ONLY} <= {p.name for p in ours}, op


# ---------------------------------------------------------------- GPU, real sizes

@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("context_lens", [[1, 300, 16, 4097], [2000] * 64])
def test_paged_attention_gpu(head_dim, context_lens):
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    q, kc, vc, bt, lens = _paged_case(context_lens, 32, 8, head_dim, 16, torch.bfloat16, "cuda", gen)
    scale = head_dim ** -0.5
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = paged_attention_decode(q, kc, vc, bt, lens, scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = paged_attention_decode_ref(q.float(), kc.float(), vc.float(), bt, lens, scale)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_write_kv_cache_gpu():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    k = torch.randn(300, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(300, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    slots = torch.randperm(64 * 16, generator=gen)[:300].cuda()
    slots[::7] = -1
    kc = torch.full((64, 16, 8, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    vc, kc_ref = kc.clone(), kc.clone()
    vc_ref = kc.clone()
    write_kv_cache(k, v, kc, vc, slots)
    write_kv_cache_ref(k, v, kc_ref, vc_ref, slots)
    torch.testing.assert_close(kc, kc_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc_ref, equal_nan=True, rtol=0, atol=0)


@pytest.mark.gpu
def test_prefill_attention_gpu():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    lens = [300, 1, 1024]
    cu = torch.tensor([0, 300, 301, 1325], dtype=torch.int32, device="cuda")
    q = torch.randn(1325, 32, 128, generator=gen).to(torch.bfloat16).cuda()
    k = torch.randn(1325, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(1325, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    out = prefill_attention(q, k, v, cu, 128 ** -0.5)
    ref = prefill_attention_ref(q.float(), k.float(), v.float(), cu, 128 ** -0.5)
    assert rel_err(out, ref) < 1e-2
    # the varlen kernel (torch's, where flash-attn is absent) took the call; SDPA per sequence agrees
    assert prefill_module.torch_varlen_attn is None or not prefill_module._torch_varlen_failed
    sdpa = prefill_module._sdpa_per_sequence(q, k, v, cu, 128 ** -0.5, [0, *itertools.accumulate(lens)])
    assert rel_err(sdpa, ref) < 1e-2


def test_prefill_takes_torch_varlen_and_falls_back_to_sdpa_once(monkeypatch, caplog):
    """Dispatch (emulated on CPU: the varlen kernels need CUDA): torch's varlen kernel gets the
    packed batch, causal as window (-1, 0) and max_seqlen from the host bounds; if it refuses a
    call, that call and every later one run SDPA per sequence, with one warning."""
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    cu_list = [0, 5, 6, 13]
    cu = torch.tensor(cu_list, dtype=torch.int32)
    q = torch.randn(13, 4, 8, generator=gen)
    k, v = torch.randn(13, 2, 8, generator=gen), torch.randn(13, 2, 8, generator=gen)
    want = prefill_attention_ref(q, k, v, cu, 0.3)
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):
        calls.append((max_q, max_k, window_size))
        if len(calls) > 1:
            raise RuntimeError("head size not supported")
        return prefill_attention_ref(q, k, v, cu_q, scale)

    monkeypatch.setattr(prefill_module, "_varlen_applies", lambda q: True)
    monkeypatch.setattr(prefill_module, "flash_attn_varlen_func", None)
    monkeypatch.setattr(prefill_module, "torch_varlen_attn", fake_varlen)
    monkeypatch.setattr(prefill_module, "_torch_varlen_failed", False)
    assert rel_err(prefill_attention(q, k, v, cu, 0.3, seq_bounds=cu_list), want) < 1e-5
    assert calls == [(7, 7, (-1, 0))]
    with caplog.at_level("WARNING", logger="kernels.prefill_attention"):
        assert rel_err(prefill_attention(q, k, v, cu, 0.3, seq_bounds=cu_list), want) < 1e-5   # the fallback
        assert rel_err(prefill_attention(q, k, v, cu, 0.3), want) < 1e-5
    assert len(calls) == 2 and prefill_module._torch_varlen_failed
    assert sum("SDPA per sequence" in r.message for r in caplog.records) == 1
