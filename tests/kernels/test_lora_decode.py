"""Fused decode LoRA (kernels/lora_decode.py) against sgmv_shrink_ref then sgmv_expand_ref.

CPU: interpreted (TRITON_INTERPRET=1, conftest.py), small shapes. GPU: Llama-3-8B sizes, marked.
"""
from __future__ import annotations

import random

import pytest
import torch

from kernels.lora_decode import lora_decode
from kernels.reference import lora_decode_ref
from kernels.tiles import fused_decode_fits
from tests.kernels.helpers import added_close, make_meta, make_pools, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, a, b, offsets, indptr, slots, ranks, scales, out0):
    return lora_decode_ref(x.float(), a.float(), b.float(), offsets, indptr, slots, ranks, scales, out0.float())


def run_case(lens, seg_slots, ranks, max_rank, rank_bound, block_t, widths, h_in, dtype, config=None,
             device=DEV, seed=None):
    seed = random.randrange(1 << 30) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    indptr, slots, tokens = make_meta(lens, seg_slots, device)
    offsets = tuple([0] + [sum(widths[: i + 1]) for i in range(len(widths))])
    a, b, slot_ranks, scales = make_pools(len(ranks), len(widths), max_rank, h_in, sum(widths), ranks, dtype,
                                          device, gen)
    x = torch.randn(tokens, h_in, generator=gen).to(dtype).to(device)
    out0 = torch.randn(tokens, sum(widths), generator=gen).to(dtype).to(device)
    out = lora_decode(x, a, b, offsets, indptr, slots, slot_ranks, scales, out0.clone(), block_t=block_t,
                      rank_bound=rank_bound, config=config)
    want = reference(x, a, b, offsets, indptr, slots, slot_ranks, scales, out0)
    return out, want, out0, seed


@pytest.mark.parametrize("block_t", [1, 2])
@pytest.mark.parametrize("config", [None, {"chunk": 16, "block_k": 8, "block_n": 8}])
def test_matches_the_two_launch_reference(block_t, config):
    """Mixed ranks <= the bound, base and empty segments, padding segments (a decode graph's table),
    3 modules of uneven widths, chunks smaller than a module (and not dividing it)."""
    lens = [1, 2, 0, 1, 3, 1, 0, 0]
    seg_slots = [2, -1, 4, 0, 3, 1, -1, -1]
    out, want, out0, seed = run_case(lens, seg_slots, ranks=[8, 3, 1, 5, 7], max_rank=16, rank_bound=8,
                                     block_t=block_t, widths=[24, 8, 40], h_in=40, dtype=torch.float32,
                                     config=config)
    assert rel_err(out, want) < 1e-4, f"seed {seed}"
    assert torch.equal(out[1:3], out0[1:3]), f"seed {seed}: base rows untouched"


def test_bf16():
    out, want, _, seed = run_case([1] * 6, [0, 1, 2, 3, 4, 5], ranks=[16, 4, 9, 16, 1, 12], max_rank=64,
                                  rank_bound=16, block_t=1, widths=[64, 32], h_in=48, dtype=torch.bfloat16)
    assert rel_err(out.float(), want) < 1e-2, f"seed {seed}"


def test_checks():
    assert fused_decode_fits(1, 16, 4096, 2) and fused_decode_fits(2, 8, 4096, 2)
    assert not fused_decode_fits(16, 16, 4096, 2)               # long segments: the two-launch path
    assert not fused_decode_fits(1, 64, 4096, 2)                # rank 64: A_m too long for one program
    assert not fused_decode_fits(1, 16, 14336, 2)               # down_proj
    assert not fused_decode_fits(1, None, 4096, 2)
    with pytest.raises(ValueError, match="rank_bound"):
        run_case([1], [0], ranks=[4], max_rank=8, rank_bound=16, block_t=1, widths=[8], h_in=8,
                 dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("module,widths,h_in", [("qkv", [4096, 1024, 1024], 4096), ("o", [4096], 4096),
                                                ("gate_up", [14336, 14336], 4096)])
def test_llama_sizes_gpu(module, widths, h_in):
    tokens, num_slots = 64, 80
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    ranks = [int(r) for r in torch.randint(1, 17, (num_slots,), generator=gen)]
    seg_slots = torch.randperm(num_slots, generator=gen)[:tokens].tolist()
    out, want, out0, seed = run_case([1] * tokens, seg_slots, ranks, max_rank=64, rank_bound=16, block_t=1,
                                     widths=widths, h_in=h_in, dtype=torch.bfloat16, device="cuda")
    assert added_close(out, out0, want), f"{module} seed {seed}"


def test_lora_linear_takes_the_fused_path_when_asked(monkeypatch):
    """LoRALinear: with OPENLORA_FUSED_DECODE=1 and ops that have lora_decode, a decode step (tile 1,
    rank bound 16) runs the fused kernel and gives what shrink + expand give; other steps do not."""
    import dataclasses

    from torch import nn

    from inference_worker.lora.layers import LoRALinear
    from inference_worker.lora.metadata import LoraBatchMeta
    from kernels.backend import REFERENCE_OPS

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["block_t"])
        return lora_decode(*args, **kwargs)

    monkeypatch.setenv("OPENLORA_FUSED_DECODE", "1")
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    fused = LoRALinear(nn.Linear(24, 40), ("q_proj", "k_proj"), (32, 8),
                       dataclasses.replace(REFERENCE_OPS, lora_decode=counted))
    monkeypatch.delenv("OPENLORA_FUSED_DECODE")
    plain = LoRALinear(fused.base_layer, ("q_proj", "k_proj"), (32, 8), REFERENCE_OPS)
    a, b, ranks, scales = make_pools(3, 2, 32, 24, 40, [16, 5, 9], torch.float32, DEV, gen)
    for lin in (fused, plain):
        lin.a_pool, lin.b_pool = a, b
        lin.shrink_scratch = torch.empty(4 * 2 * 32)
    indptr, slots, _ = make_meta([1, 1, 1, 1], [2, -1, 0, 1], DEV)
    x = torch.randn(4, 24, generator=gen)
    for block_t, rank_bound, expect_fused in ((1, 16, True), (16, 16, False), (1, 32, True), (1, None, False)):
        meta = LoraBatchMeta(has_lora=True, seg_indptr=indptr, seg_slots=slots, slot_ranks=ranks,
                             slot_scales=scales, block_t=block_t, rank_bound=rank_bound)
        calls.clear()
        got, want = fused(x, meta), plain(x, meta)
        assert bool(calls) == expect_fused, (block_t, rank_bound)
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("case", range(8))
def test_random_layouts_and_configs(case):
    """Random segment layouts (base, empty, 1-3 token segments), ranks under a random bound, 1-4
    modules of random widths, odd H_in, and block sizes that do not divide anything."""
    rng = random.Random(random.randrange(1 << 30))
    lens, slots = [], []
    while sum(lens) < rng.randint(1, 9):
        lens.append(rng.randint(0, 3))
        slots.append(rng.choice([-1, 0, 1, 2, 3, 4, 5]))
    rank_bound = rng.choice([1, 4, 8, 16, 32])
    max_rank = rng.choice([r for r in (8, 16, 32, 64) if r >= rank_bound])
    ranks = [rng.randint(1, rank_bound) for _ in range(6)]
    widths = [rng.randint(1, 40) for _ in range(rng.randint(1, 4))]
    config = {"chunk": rng.choice([4, 8, 64]), "block_k": rng.choice([4, 16, 64]), "block_n": rng.choice([4, 8, 32])}
    out, want, _, seed = run_case(lens, slots, ranks, max_rank, rank_bound, rng.choice([1, 2]), widths,
                                  rng.randint(1, 70), torch.float32, config=config)
    assert rel_err(out, want) < 1e-4, f"seed {seed}, {lens}, {slots}, {ranks}, {widths}, {config}"
