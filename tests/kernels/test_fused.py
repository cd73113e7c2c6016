"""Fused elementwise kernels (RMSNorm, add+RMSNorm, rope+KV-cache write, SiLU-and-mul) against the
PyTorch references, on fresh random inputs; and a tiny Llama run through them against the references.

CPU: interpreted (TRITON_INTERPRET=1, see conftest.py), small shapes, fp32/bf16/fp16.
GPU: Llama-3-8B sizes in bf16, marked `gpu`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random

import pytest
import torch

from kernels import reference
from kernels._common import interpreting
from kernels.activation import silu_and_mul
from kernels.rms_norm import add_rms_norm, rms_norm
from kernels.rope import rope_and_cache

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# the kernels round once where the references round after each torch op: a few ulps apart (bf16
# casts truncate under the interpreter, rounding each of two or three roundings down)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2.5e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
# rope: x1*cos - x2*sin can cancel to a small value, and the reference rounds each product first
# (as transformers does): the error then scales with the inputs (randn, up to ~5 over millions of
# samples, where a bf16 half-ulp is 2^-6), not with the output (seen on the H200: 0.0122 at 0.03)
ROPE_TOL = {**TOL, torch.bfloat16: dict(rtol=2.5e-2, atol=2 ** -5), torch.float16: dict(rtol=2e-3, atol=4e-3)}
EPS = 1e-5


def _seeded():
    seed = random.randrange(1 << 30)
    return seed, torch.Generator().manual_seed(seed)


def _rand(*shape, gen, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEV)


@contextlib.contextmanager
def _no_host_sync():
    """Any device->host sync inside raises (the launchers must be CUDA-graph capturable)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _rope_tables(max_len: int, head_dim: int, dtype, theta: float = 10000.0):
    """As LlamaForCausalLM.init_rope: fp32 angles, both halves equal, cast to the dtype."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.arange(max_len).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype).to(DEV), angles.sin().to(dtype).to(DEV)


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (3, 96), (17, 128)])
def test_rms_norm(tokens, hidden, dtype):
    seed, gen = _seeded()
    x = _rand(tokens, hidden, gen=gen, dtype=dtype, scale=3.0)
    w = (1 + _rand(hidden, gen=gen, dtype=torch.float32, scale=0.2)).to(dtype)
    out = rms_norm(x, w, EPS)
    torch.testing.assert_close(out, reference.rms_norm_ref(x, w, EPS), **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (3, 96), (17, 128)])
def test_add_rms_norm_updates_residual_in_place(tokens, hidden, dtype):
    seed, gen = _seeded()
    x = _rand(tokens, hidden, gen=gen, dtype=dtype)
    res = _rand(tokens, hidden, gen=gen, dtype=dtype, scale=4.0)
    w = (1 + _rand(hidden, gen=gen, dtype=torch.float32, scale=0.2)).to(dtype)
    res_ref, ptr = res.clone(), res.data_ptr()
    out = add_rms_norm(x, res, w, EPS)
    ref = reference.add_rms_norm_ref(x, res_ref, w, EPS)
    assert res.data_ptr() == ptr and out.data_ptr() != ptr
    # one rounded add in both: bitwise equal, but for the interpreter's fp32 -> bf16 cast, which truncates
    if dtype == torch.bfloat16 and interpreting():
        torch.testing.assert_close(res, res_ref, rtol=2 ** -7, atol=1e-30, msg=lambda m: f"seed {seed}: {m}")
    else:
        assert torch.equal(res, res_ref), f"seed {seed}: residual differs from the reference's residual += x"
    torch.testing.assert_close(out, ref, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(out, reference.rms_norm_ref(res, w, EPS), **TOL[dtype])


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(3, 64, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32, device=DEV), EPS)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x, torch.ones(64, device=DEV, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(2, 64, device=DEV), torch.ones(64, device=DEV), EPS)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(64, 3, device=DEV).t(), torch.ones(64, device=DEV), EPS)


# ---------------------------------------------------------------- rope + KV-cache write

def _rope_case(tokens, heads, kv_heads, head_dim, dtype, gen, num_blocks=5, block_size=4, max_len=300):
    qkv = _rand(tokens, (heads + 2 * kv_heads) * head_dim, gen=gen, dtype=dtype)
    positions = torch.randint(0, max_len, (tokens,), generator=gen).to(DEV)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::3] = -1                                             # padding tokens: skipped
    cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEV)
    return qkv, positions, slots.to(DEV), cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (6, 1, 128)])
def test_rope_and_cache(tokens, heads, kv_heads, head_dim, dtype):
    seed, gen = _seeded()
    qkv, positions, slots, cache = _rope_case(tokens, heads, kv_heads, head_dim, dtype, gen)
    cos, sin = _rope_tables(300, head_dim, dtype)
    kc, vc, kc_ref, vc_ref = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    q, k, v = rope_and_cache(qkv, positions, cos, sin, kc, vc, slots, heads, kv_heads, head_dim)
    q_ref, k_ref, v_ref = reference.rope_and_cache_ref(qkv, positions, cos, sin, kc_ref, vc_ref, slots,
                                                       heads, kv_heads, head_dim)
    msg = lambda m: f"seed {seed}: {m}"  # noqa: E731
    assert q.shape == (tokens, heads, head_dim) and q.is_contiguous() and k.is_contiguous()
    torch.testing.assert_close(q, q_ref, **ROPE_TOL[dtype], msg=msg)
    torch.testing.assert_close(k, k_ref, **ROPE_TOL[dtype], msg=msg)
    assert torch.equal(v, v_ref), f"seed {seed}: v is a copy"
    # rows named by slot_mapping hold k and v exactly; every other row is untouched (still NaN)
    written = torch.zeros(cache.shape[0] * cache.shape[1], dtype=torch.bool, device=DEV)
    written[slots[slots >= 0]] = True
    flat_k, flat_v = kc.view(-1, kv_heads, head_dim), vc.view(-1, kv_heads, head_dim)
    assert flat_k[~written].isnan().all() and flat_v[~written].isnan().all(), f"seed {seed}"
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], k[keep]) and torch.equal(flat_v[slots[keep]], v[keep]), f"seed {seed}"
    torch.testing.assert_close(kc, kc_ref, equal_nan=True, **TOL[dtype], msg=msg)


def test_rope_reads_both_table_halves_and_any_position():
    """Tables whose halves differ (the kernel must not assume duplicated angles), fp32, every position."""
    seed, gen = _seeded()
    heads, kv_heads, head_dim, max_len = 2, 1, 64, 40
    tokens = max_len
    qkv, _, slots, cache = _rope_case(tokens, heads, kv_heads, head_dim, torch.float32, gen, num_blocks=10)
    positions = torch.randperm(max_len, generator=gen).to(DEV)
    cos, sin = _rand(max_len, head_dim, gen=gen, dtype=torch.float32), _rand(max_len, head_dim, gen=gen,
                                                                             dtype=torch.float32)
    kc, vc, kc_ref, vc_ref = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    got = rope_and_cache(qkv, positions, cos, sin, kc, vc, slots, heads, kv_heads, head_dim)
    want = reference.rope_and_cache_ref(qkv, positions, cos, sin, kc_ref, vc_ref, slots, heads, kv_heads, head_dim)
    for a, b in zip((*got, kc, vc), (*want, kc_ref, vc_ref)):
        torch.testing.assert_close(a, b, equal_nan=True, **TOL[torch.float32], msg=lambda m: f"seed {seed}: {m}")


def test_rope_and_cache_into_given_outputs():
    """out=(q, k, v): the same values written into the caller's tensors (a prompt graph's static
    buffers), in the Triton op and the reference; a wrong-shaped out is refused."""
    seed, gen = _seeded()
    heads, kv_heads, head_dim, tokens = 4, 2, 64, 5
    qkv, positions, slots, cache = _rope_case(tokens, heads, kv_heads, head_dim, torch.float32, gen)
    cos, sin = _rope_tables(300, head_dim, torch.float32)
    want = reference.rope_and_cache_ref(qkv, positions, cos, sin, cache.clone(), cache.clone(), slots, heads,
                                        kv_heads, head_dim)
    for op in (rope_and_cache, reference.rope_and_cache_ref):
        out = tuple(torch.full_like(t, float("nan")) for t in want)
        got = op(qkv, positions, cos, sin, cache.clone(), cache.clone(), slots, heads, kv_heads, head_dim, out=out)
        assert all(g is o for g, o in zip(got, out))
        for a, b in zip(out, want):
            torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"seed {seed}: {m}")
    with pytest.raises(ValueError, match="out k"):
        rope_and_cache(qkv, positions, cos, sin, cache.clone(), cache.clone(), slots, heads, kv_heads, head_dim,
                       out=(want[0].clone(), want[0].clone(), want[2].clone()))


def test_rope_and_cache_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    qkv, positions, slots, cache = _rope_case(3, 4, 2, 64, torch.float32, gen)
    cos, sin = _rope_tables(300, 64, torch.float32)
    with pytest.raises(ValueError, match="qkv"):
        rope_and_cache(qkv, positions, cos, sin, cache, cache.clone(), slots, 4, 1, 64)
    with pytest.raises(ValueError, match="cos"):
        rope_and_cache(qkv, positions, cos[:, :32], sin[:, :32], cache, cache.clone(), slots, 4, 2, 64)
    with pytest.raises(ValueError, match="positions"):
        rope_and_cache(qkv, positions.float(), cos, sin, cache, cache.clone(), slots, 4, 2, 64)
    with pytest.raises(ValueError, match="caches"):
        rope_and_cache(qkv, positions, cos, sin, cache[:, :, :1], cache[:, :, :1], slots, 4, 2, 64)


# ---------------------------------------------------------------- SiLU-and-mul

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 72), (3, 45), (17, 128)])
def test_silu_and_mul(tokens, inter, dtype):
    seed, gen = _seeded()
    gate_up = _rand(tokens, 2 * inter, gen=gen, dtype=dtype, scale=3.0)
    out = silu_and_mul(gate_up)
    assert out.shape == (tokens, inter)
    torch.testing.assert_close(out, reference.silu_and_mul_ref(gate_up), **TOL[dtype],
                               msg=lambda m: f"seed {seed}: {m}")
    assert torch.equal(silu_and_mul(gate_up, block=16), out), f"seed {seed}: several column blocks"


def test_silu_and_mul_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2I"):
        silu_and_mul(torch.randn(3, 7, device=DEV))
    with pytest.raises(ValueError, match="contiguous"):
        silu_and_mul(torch.randn(8, 3, device=DEV).t())


# ---------------------------------------------------------------- the model through the fused ops

def test_tiny_llama_with_fused_kernels_matches_reference_ops():
    """A prefill step then a decode step of a 2-layer Llama, with the four fused ops as Triton
    kernels and every other op a reference, against the all-reference model (fp32)."""
    from inference_worker.attention import AttentionMeta
    from inference_worker.lora.metadata import LoraBatchMeta
    from inference_worker.model.llama import LlamaSpec
    from inference_worker.model.random_init import random_model
    from kernels.backend import REFERENCE_OPS

    seed = random.randrange(1 << 30)
    fused = dataclasses.replace(REFERENCE_OPS, name="fused", rms_norm=rms_norm, add_rms_norm=add_rms_norm,
                                rope_and_cache=rope_and_cache, silu_and_mul=silu_and_mul)
    spec = LlamaSpec(vocab_size=97, hidden_size=64, intermediate_size=88, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64,
                     rope={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                     qkv_bias=False, o_bias=False, mlp_bias=False)
    dev, block_size, num_blocks = torch.device(DEV), 4, 8
    i32 = dict(dtype=torch.int32, device=dev)
    lora = LoraBatchMeta(False, torch.zeros(1, **i32), torch.zeros(0, **i32), torch.zeros(0, **i32),
                         torch.zeros(0, device=dev))
    # prefill of two sequences (5 and 3 tokens, blocks 0-1 and 2), then one decode token each
    prefill = AttentionMeta(8, 0, torch.tensor([0, 1, 2, 3, 4, 8, 9, 10], device=dev),
                            torch.tensor([0, 5, 8], **i32), torch.zeros(0, 1, **i32), torch.zeros(0, **i32))
    decode = AttentionMeta(0, 2, torch.tensor([5, 11], device=dev), torch.zeros(1, **i32),
                           torch.tensor([[0, 1], [2, 3]], **i32), torch.tensor([6, 4], **i32))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (10,), generator=gen).to(dev)
    logits = []
    for ops in (REFERENCE_OPS, fused):
        model = random_model(spec, ops, dev, torch.float32, max_len=64, seed=seed % 1000)
        for layer in model.modules():                       # norms away from 1: the weight matters
            if hasattr(layer, "eps"):
                layer.weight.data.uniform_(0.5, 1.5, generator=torch.Generator(dev).manual_seed(seed))
        caches = [(torch.zeros(num_blocks, block_size, 2, 16, device=dev),
                   torch.zeros(num_blocks, block_size, 2, 16, device=dev)) for _ in range(spec.num_layers)]
        with torch.inference_mode():
            first = model(ids[:8], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device=dev), caches, prefill, lora,
                          torch.tensor([4, 7], device=dev))
            second = model(ids[8:], torch.tensor([5, 3], device=dev), caches, decode, lora,
                           torch.tensor([0, 1], device=dev))
        logits.append(torch.cat([first, second]))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed}: {m}")


# ---------------------------------------------------------------- GPU, Llama-3-8B sizes

@pytest.mark.gpu
class TestLlama8BSizes:
    H, HQ, HKV, D, INTER = 4096, 32, 8, 128, 14336

    @pytest.mark.parametrize("tokens", [64, 2048])
    def test_norms(self, tokens):
        seed, gen = _seeded()
        x = _rand(tokens, self.H, gen=gen, dtype=torch.bfloat16)
        res = _rand(tokens, self.H, gen=gen, dtype=torch.bfloat16, scale=4.0)
        w = _rand(self.H, gen=gen, dtype=torch.bfloat16, scale=0.3) + 1
        res_ref = res.clone()
        with _no_host_sync():
            normed = rms_norm(x, w, EPS)
            out = add_rms_norm(x, res, w, EPS)
        torch.testing.assert_close(normed, reference.rms_norm_ref(x, w, EPS), **TOL[torch.bfloat16])
        ref = reference.add_rms_norm_ref(x, res_ref, w, EPS)
        assert torch.equal(res, res_ref), f"seed {seed}"
        torch.testing.assert_close(out, ref, **TOL[torch.bfloat16], msg=lambda m: f"seed {seed}: {m}")

    @pytest.mark.parametrize("tokens", [64, 2048])
    def test_rope_and_cache(self, tokens):
        seed, gen = _seeded()
        qkv, positions, slots, cache = _rope_case(tokens, self.HQ, self.HKV, self.D, torch.bfloat16, gen,
                                                  num_blocks=256, block_size=16, max_len=8192)
        cos, sin = _rope_tables(8192, self.D, torch.bfloat16, theta=500000.0)
        kc, vc, kc_ref, vc_ref = cache.clone(), cache.clone(), cache.clone(), cache.clone()
        with _no_host_sync():
            got = rope_and_cache(qkv, positions, cos, sin, kc, vc, slots, self.HQ, self.HKV, self.D)
        want = reference.rope_and_cache_ref(qkv, positions, cos, sin, kc_ref, vc_ref, slots, self.HQ, self.HKV,
                                            self.D)
        for a, b in zip((*got, kc, vc), (*want, kc_ref, vc_ref)):
            torch.testing.assert_close(a, b, equal_nan=True, **ROPE_TOL[torch.bfloat16],
                                       msg=lambda m: f"seed {seed}: {m}")

    @pytest.mark.parametrize("tokens", [64, 2048])
    def test_silu_and_mul(self, tokens):
        seed, gen = _seeded()
        gate_up = _rand(tokens, 2 * self.INTER, gen=gen, dtype=torch.bfloat16, scale=3.0)
        with _no_host_sync():
            out = silu_and_mul(gate_up)
        torch.testing.assert_close(out, reference.silu_and_mul_ref(gate_up), **TOL[torch.bfloat16],
                                   msg=lambda m: f"seed {seed}: {m}")

    def test_graph_replay(self):
        """All four captured in one CUDA graph replay what they compute eagerly."""
        _, gen = _seeded()
        tokens = 8
        x = _rand(tokens, self.H, gen=gen, dtype=torch.bfloat16)
        res = _rand(tokens, self.H, gen=gen, dtype=torch.bfloat16)
        w = _rand(self.H, gen=gen, dtype=torch.bfloat16) + 1
        qkv, positions, slots, cache = _rope_case(tokens, self.HQ, self.HKV, self.D, torch.bfloat16, gen,
                                                  num_blocks=4, block_size=16, max_len=4096)
        cos, sin = _rope_tables(4096, self.D, torch.bfloat16)
        gate_up = _rand(tokens, 2 * self.INTER, gen=gen, dtype=torch.bfloat16)
        kc, vc = cache.clone(), cache.clone()

        def step():
            return (rms_norm(x, w, EPS), add_rms_norm(x, res, w, EPS),
                    *rope_and_cache(qkv, positions, cos, sin, kc, vc, slots, self.HQ, self.HKV, self.D),
                    silu_and_mul(gate_up))

        res0 = res.clone()
        want = step()                                           # also compiles the kernels
        kc_want, vc_want, res_want = kc.clone(), vc.clone(), res.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = step()
        res.copy_(res0)
        kc.fill_(float("nan"))
        vc.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip((*got, kc, vc, res), (*want, kc_want, vc_want, res_want)):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
