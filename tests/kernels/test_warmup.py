"""Compiling the eager SGMV variants ahead (inference_worker/lora/warmup.py): the sampled walk finds
every variant an eager step can make, and the warm-up launches them without touching adapters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from inference_worker.lora.layers import LoRALinear
from inference_worker.lora.slot_pool import SlotPool
from inference_worker.lora.warmup import eager_variants, token_counts, variant_key, warm_lora_kernels
from kernels.tiles import segment_table_width
from kernels.triton_ops import TRITON_OPS

# (H_in, M, R, N, feeds the activation): q/k/v, down, gate/up (kernels/lora_silu_mul.py in place of the expand)
LLAMA8B_SHAPES = [(4096, 3, 64, 6144, False), (14336, 1, 64, 4096, False), (4096, 2, 64, 28672, True)]


@pytest.mark.parametrize("shape", LLAMA8B_SHAPES)
def test_walk_finds_every_variant_of_every_step_shape(shape):
    """Every (T, G) with G <= T, against the walk (every T to 1024, then every 16th, one G per tile)."""
    max_tokens, max_segs = 1400, 40
    block_g = segment_table_width(max_segs)
    every = {variant_key(shape, t, g, block_g, torch.bfloat16)
             for t in range(1, max_tokens + 1) for g in range(1, min(t, max_segs) + 1)}
    walked = eager_variants(shape, max_tokens, max_segs, block_g, torch.bfloat16)
    assert set(walked) == every
    assert len(every) < 60                       # what a fixed segment-table width leaves to compile
    for key, (t, g) in walked.items():
        assert g <= min(t, max_segs) and variant_key(shape, t, g, block_g, torch.bfloat16) == key


def test_walk_above_the_prompt_graphs_finds_the_variants_of_larger_steps():
    """min_tokens: only steps of more tokens run eagerly (the prompt graphs take the rest)."""
    shape, max_tokens, max_segs, block_g = LLAMA8B_SHAPES[1], 1400, 40, 64
    every = {variant_key(shape, t, g, block_g, torch.bfloat16)
             for t in range(1025, max_tokens + 1) for g in range(1, min(t, max_segs) + 1)}
    walked = eager_variants(shape, max_tokens, max_segs, block_g, torch.bfloat16, min_tokens=1024)
    assert set(walked) == every and all(t > 1024 for t, _ in walked.values())
    assert eager_variants(shape, max_tokens, max_segs, block_g, torch.bfloat16, min_tokens=max_tokens) == {}


def test_token_walk_is_exhaustive_then_strided_and_ends_at_the_budget():
    walk = list(token_counts(131072))                # a 128k-context model's token budget
    assert walk[:1024] == list(range(1, 1025)) and walk[1024:1027] == [1040, 1056, 1072]
    assert walk[-1] == 131072 and walk == sorted(set(walk)) and len(walk) < 2000
    assert list(token_counts(5)) == [1, 2, 3, 4, 5] and list(token_counts(1030))[-1] == 1030
    # each variant is launched at the smallest T that makes it: a few thousand tokens at most
    most = max(t for t, _ in eager_variants(LLAMA8B_SHAPES[0], 131072, 64, 128, torch.bfloat16).values())
    assert most <= 8192


def test_a_fixed_table_width_serves_any_segment_count():
    with pytest.raises(ValueError, match="block_g"):
        variant_key(LLAMA8B_SHAPES[0], 64, 40, 32, torch.bfloat16)     # 40 segments need 64
    with pytest.raises(ValueError, match="block_g"):
        variant_key(LLAMA8B_SHAPES[0], 64, 4, 24, torch.bfloat16)      # not a power of 2


def test_warm_up_launches_each_variant_and_leaves_the_pools_alone():
    """Interpreted on CPU (no GPU): a tiny fused q/k/v, an o projection and a gate/up feeding the activation."""
    torch.manual_seed(0)
    lins = [LoRALinear(nn.Linear(16, 24, bias=False), ("q_proj", "k_proj", "v_proj"), (8, 8, 8), TRITON_OPS),
            LoRALinear(nn.Linear(8, 16, bias=False), ("o_proj",), (16,), TRITON_OPS),
            LoRALinear(nn.Linear(8, 32, bias=False), ("gate_proj", "up_proj"), (16, 16), TRITON_OPS, silu_mul=True)]
    max_tokens, max_segs = 24, 3
    pool = SlotPool([(0, lin) for lin in lins], num_slots=2, max_rank=4, max_tokens=max_tokens,
                    device=torch.device("cpu"), dtype=torch.float32)
    for lin in lins:
        lin.a_pool.normal_()
        lin.b_pool.normal_()
    before = [(lin.a_pool.clone(), lin.b_pool.clone()) for lin in lins]
    block_g = segment_table_width(max_segs)
    launches = warm_lora_kernels(pool, max_tokens, max_segs, block_g)
    shapes = [(16, 3, 4, 24, False), (8, 1, 4, 16, False), (8, 2, 4, 32, True)]
    assert launches == sum(len(eager_variants(s, max_tokens, max_segs, block_g, torch.float32)) for s in shapes)
    assert launches >= 2 * 3                     # several token tiles per shape
    for lin, (a, b) in zip(lins, before):
        assert lin.a_pool.equal(a) and lin.b_pool.equal(b)
