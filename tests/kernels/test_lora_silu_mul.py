"""The gate/up expand inside the activation (kernels/lora_silu_mul.py) against its reference
(sgmv_expand_ref into a copy, then silu_and_mul_ref), and LoRALinear.forward_silu_mul.

CPU: interpreted, small shapes. GPU (marked): Llama-3-8B's gate/up at prompt sizes, bf16.
"""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from inference_worker.lora.layers import LoRALinear
from inference_worker.lora.metadata import LoraBatchMeta
from kernels.backend import REFERENCE_OPS
from kernels.lora_silu_mul import launch_config, lora_silu_mul
from kernels.reference import lora_silu_mul_ref
from tests.kernels.helpers import make_meta, make_pools, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# half precision: the interpreter's bf16 tl.dot gives garbage (triton 3.9, CPU), so fp16 there
HALF = torch.bfloat16 if DEV == "cuda" else torch.float16

# name -> (segment lengths, segment slots (-1 base), slot ranks, max rank)
SCENARIOS = {
    "prompts_and_base": ([21, 0, 9, 17], [1, -1, 0, 2], [16, 5, 9], 16),
    "one_adapter": ([40], [0], [3], 8),
    "all_base": ([12, 5], [-1, -1], [8], 8),
    "mixed_ranks_rank64_pool": ([18, 3, 20], [2, 0, 1], [64, 8, 33], 64),
    "decode_like_short_segments": ([1, 2, 1, 1, 3], [0, 1, -1, 2, 3], [4, 16, 7, 1], 16),
}


def _case(name, inter, h_tail, dtype, seed):
    """-> (args of lora_silu_mul, reference out); h_tail tokens past the last segment (no adapter)."""
    seg_lens, seg_slots, ranks, max_rank = SCENARIOS[name]
    gen = torch.Generator().manual_seed(seed)
    indptr, slots, num_tokens = make_meta(seg_lens, seg_slots, DEV)
    num_tokens += h_tail
    _, b, slot_ranks, scales = make_pools(len(ranks), 2, max_rank, 8, 2 * inter, ranks, dtype, DEV, gen)
    y = torch.randn(num_tokens, 2, max_rank, generator=gen).to(DEV)
    y[:, :, max(ranks):] = float("nan")               # rows past every rank: never read
    gate_up = (torch.randn(num_tokens, 2 * inter, generator=gen) * 2).to(dtype).to(DEV)
    args = (y, b, gate_up, indptr, slots, slot_ranks, scales)
    ref = lora_silu_mul_ref(y.double(), b.double(), gate_up.double(), indptr, slots, slot_ranks, scales)
    return args, ref


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("one_step", [True, False])
def test_fused_matches_expand_then_activation_fp32(name, one_step):
    """one_step: ranks within one 16-row step (pools of rank <= 16) take the loop-free path, unless turned off."""
    seed = random.randrange(1 << 30)
    args, ref = _case(name, 24, 3, torch.float32, seed)
    gate_up = args[2].clone()
    out = lora_silu_mul(*args, config={"block_n": 16, "one_step": one_step})
    assert out.shape == (gate_up.shape[0], 24) and args[2].equal(gate_up), "gate_up is not modified"
    assert rel_err(out, ref) < 1e-4, f"{name} (seed {seed})"


def test_one_step_follows_the_rank_bound():
    assert launch_config(64, 8, {}, 16)["one_step"]
    assert not launch_config(64, 8, {}, 64)["one_step"]               # a rank-64 pool: the rank loop
    assert launch_config(64, 8, {"rank_bound": 16}, 64)["one_step"]   # unless the step's bound says otherwise
    assert not launch_config(64, 8, {"rank_bound": 16, "one_step": False}, 64)["one_step"]
    assert not launch_config(64, 8, {})["one_step"]                   # no bound known
    assert launch_config(2048, 8, {}, 16)["one_step"]                 # prompt tiles of 32 tokens too
    assert not launch_config(2048, 8, {"block_t": 64}, 16)["one_step"]  # 64: the loop, unless asked
    assert launch_config(2048, 8, {"block_t": 64, "one_step": True}, 16)["one_step"]


def test_fused_half_precision_and_tile_choices():
    """bf16 (fp16 interpreted) with the defaults' 16-row rank steps and a 32-token tile; a decode-sized tile asked for is
    widened to 16 rows (tl.dot)."""
    seed = random.randrange(1 << 30)
    args, ref = _case("prompts_and_base", 40, 5, HALF, seed)
    for config in ({"block_n": 32}, {"block_t": 32, "block_n": 16}, {"block_t": 1, "block_n": 16}):
        assert rel_err(lora_silu_mul(*args, config=config), ref) < 1e-2, f"{config} (seed {seed})"


def test_fused_rejects_bad_inputs():
    args, _ = _case("one_adapter", 16, 0, torch.float32, 0)
    y, b, gate_up, *meta = args
    with pytest.raises(ValueError, match="need y"):
        lora_silu_mul(y[:, :1], b, gate_up, *meta)
    with pytest.raises(ValueError, match="shapes do not match"):
        lora_silu_mul(y, b, gate_up[:, :-2], *meta)
    with pytest.raises(ValueError, match="block_r"):
        lora_silu_mul(y, b, gate_up, *meta, config={"block_r": 32})


def test_lora_linear_adds_the_gate_up_lora_in_the_activation_for_prompt_tiles():
    """forward_silu_mul: long tiles take lora_silu_mul, decode tiles the expand then the activation;
    both give silu_and_mul of forward()."""
    calls = []
    ops = REFERENCE_OPS.__class__(**{**REFERENCE_OPS.__dict__,
                                     "lora_silu_mul": lambda *a, **k: calls.append(1) or lora_silu_mul_ref(*a, **k)})
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    lin = LoRALinear(nn.Linear(24, 40), ("gate_proj", "up_proj"), (20, 20), ops, silu_mul=True)
    # on the CPU wherever the tests run: the reference ops and the layer's weights live there
    a, b, ranks, scales = make_pools(3, 2, 16, 24, 40, [16, 5, 9], torch.float32, "cpu", gen)
    lin.a_pool, lin.b_pool = a, b
    lin.shrink_scratch = torch.empty(6 * 2 * 16)
    indptr, slots, _ = make_meta([3, 1, 2], [2, -1, 0], "cpu")
    x = torch.randn(6, 24, generator=gen)
    for block_t, fused in ((None, True), (32, True), (16, True), (1, False), (2, False)):
        calls.clear()
        meta = LoraBatchMeta(has_lora=True, seg_indptr=indptr, seg_slots=slots, slot_ranks=ranks,
                             slot_scales=scales, block_t=block_t, rank_bound=16)
        want = REFERENCE_OPS.silu_and_mul(lin(x, meta))
        got = lin.forward_silu_mul(x, meta)
        assert rel_err(got, want) < 1e-5 and bool(calls) == fused, block_t
    base_only = LoraBatchMeta(False, indptr, slots, ranks, scales)
    assert lin.forward_silu_mul(x, base_only).equal(REFERENCE_OPS.silu_and_mul(lin.base_layer(x)))


@pytest.mark.gpu
@pytest.mark.parametrize("seg_lens,ranks,pool_rank", [([256] * 8, [16] * 8, 16), ([300, 1, 1, 700, 2, 1000],
                                                                                   [8, 64, 16, 32, 64, 8], 64)])
def test_fused_gpu_llama_gate_up(seg_lens, ranks, pool_rank):
    """Llama-3-8B's gate/up (I = 14336) in bf16: a 2048-token prompt step over 8 adapters, and a
    mixed step of long and 1-token segments of ranks 8..64 with 40 tokens past the last segment;
    against the reference and against the unfused Triton pair (sgmv_expand + silu_and_mul)."""
    from kernels.activation import silu_and_mul
    from kernels.sgmv_expand import sgmv_expand

    inter, num_slots = 14336, len(ranks)
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    indptr, slots, num_tokens = make_meta(seg_lens, list(range(num_slots)), DEV)
    num_tokens += 40
    _, b, slot_ranks, scales = make_pools(num_slots, 2, pool_rank, 8, 2 * inter, ranks, torch.bfloat16, DEV, gen)
    y = torch.randn(num_tokens, 2, pool_rank, generator=gen).to(DEV)
    gate_up = torch.randn(num_tokens, 2 * inter, generator=gen).to(torch.bfloat16).to(DEV)
    out = lora_silu_mul(y, b, gate_up, indptr, slots, slot_ranks, scales)
    ref = lora_silu_mul_ref(y.float(), b.float(), gate_up.float(), indptr, slots, slot_ranks, scales)
    assert rel_err(out, ref) < 1e-2
    pair = silu_and_mul(sgmv_expand(y, b, (0, inter, 2 * inter), indptr, slots, slot_ranks, scales, gate_up.clone()))
    assert rel_err(out, pair) < 1e-2
