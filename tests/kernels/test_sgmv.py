"""SGMV shrink/expand (Triton) against the PyTorch references, on fresh random batches.

CPU: interpreted (TRITON_INTERPRET=1, see conftest.py), small shapes, fp32 (and a bf16 case).
GPU: real Llama-3-8B sizes in bf16, marked `gpu`.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from inference_worker.lora.metadata import segments_of
from kernels.reference import sgmv_expand_ref, sgmv_shrink_ref
from kernels.sgmv_expand import sgmv_expand
from kernels.sgmv_shrink import sgmv_shrink
from kernels.tiles import segment_table_width
from tests.kernels.helpers import added_close, make_meta, make_pools, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
OUT_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}

# name -> (segment lengths, segment slots (-1 base), slot ranks, max rank)
SCENARIOS = {
    "decode_every_token_own_adapter": ([1] * 7, [0, 3, 1, 5, 2, 4, 6], [8, 1, 5, 8, 3, 7, 2], 8),
    "long_segments": ([37, 21], [1, 0], [16, 11], 16),
    "long_segments_mixed_ranks": ([37, 21, 18], [1, 0, 2], [64, 8, 33], 64),   # dot path, 16-row steps
    "empty_and_base_segments": ([0, 5, 3, 0, 6, 2, 0], [2, -1, 0, 1, -1, 2, 3], [4, 2, 3, 1], 4),
    "all_base": ([4, 3], [-1, -1], [8, 8], 8),
    "one_adapter_for_all": ([19], [2], [3, 5, 6], 8),
    "ranks_1_to_128": ([2, 1, 3, 1], [0, 1, 2, 3], [128, 1, 77, 33], 128),
    "mixed_short": ([3, 2, 4, 1, 5], [4, 0, -1, 2, 1], [2, 16, 9, 5, 13], 16),
}


def _run_case(name, seed, num_mods, widths, h_in, dtype, y_dtype, shrink_cfg=None, expand_cfg=None):
    seg_lens, seg_slots, ranks, max_rank = SCENARIOS[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    indptr, slots, num_tokens = make_meta(seg_lens, seg_slots, DEV)
    n_out = sum(widths)
    offsets = tuple([0] + [sum(widths[: i + 1]) for i in range(len(widths))])
    a, b, slot_ranks, slot_scales = make_pools(len(ranks), num_mods, max_rank, h_in, n_out, ranks,
                                               dtype, DEV, gen)
    x = torch.randn(num_tokens, h_in, generator=gen).to(dtype).to(DEV)

    y = torch.full((num_tokens, num_mods, max_rank), float("nan"), dtype=y_dtype, device=DEV)
    sgmv_shrink(x, a, indptr, slots, slot_ranks, y, config=shrink_cfg)
    y_ref = sgmv_shrink_ref(x.double(), a.double(), indptr, slots, slot_ranks,
                            torch.empty(y.shape, dtype=torch.float64, device=DEV))
    err = rel_err(y, y_ref)
    assert err < TOL[dtype], f"shrink {name} (seed {seed}): rel err {err}"

    out0 = torch.randn(num_tokens, n_out, generator=gen).to(dtype).to(DEV)
    out = out0.clone()
    sgmv_expand(y, b, offsets, indptr, slots, slot_ranks, slot_scales, out, config=expand_cfg)
    out_ref = sgmv_expand_ref(y.double(), b.double(), offsets, indptr, slots, slot_ranks, slot_scales,
                              out0.double())
    if name == "all_base":
        err = rel_err(out, out_ref)
        assert err < TOL[dtype], f"expand {name}: rel err {err}"
        return
    # the delta must be right to TOL, up to the one rounding of out into its dtype (which the
    # interpreter does by truncation: a whole ulp of out, not half)
    delta_ref = out_ref - out0.double()
    resid = (out.double() - out_ref).norm().item()
    bound = TOL[dtype] * delta_ref.norm().item() + OUT_ULP[dtype] * out_ref.norm().item()
    assert resid <= bound, f"expand {name} (seed {seed}): |out - ref| {resid:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sgmv_default_config_fp32(name):
    seed = random.randrange(1 << 30)
    # R = 128 with the decode default (4 rank rows a program) is ~1000 interpreted programs: fewer on CPU
    cfg = {"block_n": 32} if SCENARIOS[name][3] == 128 and DEV == "cpu" else None
    _run_case(name, seed, num_mods=3, widths=[13, 7, 21], h_in=37, dtype=torch.float32, y_dtype=torch.float32,
              shrink_cfg=cfg)


@pytest.mark.parametrize("name", ["decode_every_token_own_adapter", "long_segments", "empty_and_base_segments",
                                  "mixed_short"])
@pytest.mark.parametrize("path", ["small", "dot"])
def test_sgmv_forced_paths(name, path):
    """Both inner paths on every segment shape, split-K on and off, x-dtype y (no atomics)."""
    seed = random.randrange(1 << 30)
    if path == "small":
        scfg, ecfg = {"block_t": 2, "block_n": 8, "block_k": 32, "split_k": 1}, {"block_t": 4, "block_n": 16, "block_r": 4}
    else:
        scfg, ecfg = {"block_t": 16, "block_n": 16, "block_k": 16, "split_k": 3}, {"block_t": 16, "block_n": 16, "block_r": 16}
    y_dtype = torch.float32
    _run_case(name, seed, num_mods=2, widths=[19, 30], h_in=53, dtype=torch.float32, y_dtype=y_dtype,
              shrink_cfg=scfg, expand_cfg=ecfg)


@pytest.mark.parametrize("name", ["decode_every_token_own_adapter", "empty_and_base_segments", "ranks_1_to_128",
                                  "all_base"])
@pytest.mark.parametrize("nbp,early", [(1, True), (3, True), (2, False)])
def test_sgmv_one_token_tiles(name, nbp, early):
    """1-token tiles, with their first weights read before the PDL wait (config "early", the default)
    and without: column blocks past the last, ranks past one row block, base and empty segments."""
    scfg = {"block_t": 1, "block_n": 8, "block_k": 16, "split_k": 2, "early": early}
    ecfg = {"block_t": 1, "block_n": 8, "block_r": 4, "nb_per_prog": nbp, "early": early}
    _run_case(name, random.randrange(1 << 30), num_mods=2, widths=[19, 30], h_in=53, dtype=torch.float32,
              y_dtype=torch.float32, shrink_cfg=scfg, expand_cfg=ecfg)


@pytest.mark.parametrize("name", ["long_segments", "empty_and_base_segments", "one_adapter_for_all", "mixed_short",
                                  "decode_every_token_own_adapter", "long_segments_mixed_ranks"])
@pytest.mark.parametrize("nbp,early", [(1, False), (3, False), (1, True), (3, True)])
def test_expand_dot_tiles_prefetched(name, nbp, early):
    """Dot tiles with the next column block's loads issued before this block's dot (config "prefetch"),
    with the first block's B read before the PDL wait (config "early_dot") and without: groups of blocks
    that cross a module boundary and run past the last block, base and empty segments; ranks 8, 33 and 64
    in one 64-row step (the default past rank 16)."""
    block_r = 64 if SCENARIOS[name][3] > 16 else 16
    ecfg = {"block_t": 16, "block_n": 16, "block_r": block_r, "nb_per_prog": nbp, "prefetch": True,
            "early_dot": early}
    _run_case(name, random.randrange(1 << 30), num_mods=2, widths=[19, 30], h_in=53, dtype=torch.float32,
              y_dtype=torch.float32, shrink_cfg={"block_t": 2}, expand_cfg=ecfg)


@pytest.mark.parametrize("name", ["long_segments", "one_adapter_for_all", "long_segments_mixed_ranks",
                                  "empty_and_base_segments"])
@pytest.mark.parametrize("block_t", [64, 128])
def test_sgmv_wide_token_tiles(name, block_t):
    """Token tiles longer than any segment (a step of one adapter takes tiles of up to 128 tokens):
    the shrink split over H_in, the expand loop-free where the ranks fit one step."""
    rank = SCENARIOS[name][3]
    block_r = 64 if rank > 16 else 16
    scfg = {"block_t": block_t, "block_n": 16, "block_k": 16, "split_k": 2, "zero": "kernel"}
    ecfg = {"block_t": block_t, "block_n": 16, "block_r": block_r, "prefetch": rank <= block_r, "early_dot": True}
    _run_case(name, random.randrange(1 << 30), num_mods=2, widths=[19, 30], h_in=53, dtype=torch.float32,
              y_dtype=torch.float32, shrink_cfg=scfg, expand_cfg=ecfg)


def test_expand_prefetch_needs_one_rank_step():
    y, b = torch.zeros(3, 1, 32, device=DEV), torch.zeros(2, 32, 8, device=DEV)
    indptr, slots, _ = make_meta([3], [0], DEV)
    ranks, scales = torch.full((2,), 32, dtype=torch.int32, device=DEV), torch.ones(2, device=DEV)
    with pytest.raises(ValueError, match="prefetch"):
        sgmv_expand(y, b, (0, 8), indptr, slots, ranks, scales, torch.zeros(3, 8, device=DEV),
                    config={"block_t": 16, "block_n": 16, "block_r": 16, "prefetch": True})


def test_sgmv_y_in_x_dtype_no_split():
    _run_case("mixed_short", random.randrange(1 << 30), num_mods=1, widths=[23], h_in=29,
              dtype=torch.float32, y_dtype=torch.float32, shrink_cfg={"split_k": 1})


def test_sgmv_bf16():
    _run_case("empty_and_base_segments", random.randrange(1 << 30), num_mods=2, widths=[24, 17], h_in=40,
              dtype=torch.bfloat16, y_dtype=torch.bfloat16)


def test_shrink_tail_tokens_past_last_segment_are_zeroed():
    indptr, slots, _ = make_meta([2, 3], [0, 1], DEV)
    a, _, ranks, _ = make_pools(2, 1, 4, 8, 4, [4, 2], torch.float32, DEV)
    x = torch.randn(7, 8, device=DEV)                       # 2 tokens not in any segment
    y = torch.full((7, 1, 4), float("nan"), device=DEV)
    sgmv_shrink(x, a, indptr, slots, ranks, y, config={"split_k": 1})
    assert torch.equal(y[5:], torch.zeros_like(y[5:]))
    assert rel_err(y, sgmv_shrink_ref(x, a, indptr, slots, ranks, torch.empty_like(y))) < 1e-4


def test_launchers_reject_bad_inputs():
    indptr, slots, _ = make_meta([2], [0], DEV)
    a, b, ranks, scales = make_pools(1, 1, 4, 8, 6, [4], torch.float32, DEV)
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="out must be"):
        sgmv_shrink(x, a, indptr, slots, ranks, torch.empty(2, 1, 3, device=DEV))
    with pytest.raises(ValueError, match="dtype"):
        sgmv_shrink(x.half(), a, indptr, slots, ranks, torch.empty(2, 1, 4, device=DEV))
    with pytest.raises(ValueError, match="seg_indptr"):
        sgmv_shrink(x, a, indptr.long(), slots, ranks, torch.empty(2, 1, 4, device=DEV))
    with pytest.raises(ValueError, match="split_k"):
        sgmv_shrink(x.half(), a.half(), indptr, slots, ranks, torch.empty(2, 1, 4, device=DEV).half(),
                    config={"split_k": 2})
    with pytest.raises(ValueError, match="contiguous"):
        sgmv_shrink(torch.randn(8, 2, device=DEV).t(), a, indptr, slots, ranks, torch.empty(2, 1, 4, device=DEV))
    y = torch.zeros(2, 1, 4, device=DEV)
    with pytest.raises(ValueError, match="out_offsets"):
        sgmv_expand(y, b, (0, 5), indptr, slots, ranks, scales, torch.zeros(2, 6, device=DEV))
    with pytest.raises(ValueError, match="slot_scales"):
        sgmv_expand(y, b, (0, 6), indptr, slots, ranks, scales.double(), torch.zeros(2, 6, device=DEV))


# ---------------------------------------------------------------- GPU, real sizes

LLAMA8B = {  # name -> (H_in, output widths of the fused modules)
    "qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}


def _random_batch(num_tokens, num_adapters, num_slots, with_base, gen):
    """Segments over num_adapters distinct slots (random lengths summing to num_tokens)."""
    num_segs = num_adapters + (1 if with_base else 0)
    cuts = sorted(random.Random(int(torch.randint(1 << 30, (1,), generator=gen))).sample(
        range(1, num_tokens), min(num_segs - 1, num_tokens - 1))) if num_segs > 1 else []
    bounds = [0] + cuts + [num_tokens]
    lens = [b - a for a, b in itertools.pairwise(bounds)]
    lens += [0] * (num_segs - len(lens))
    slots = torch.randperm(num_slots, generator=gen)[:num_adapters].tolist()
    if with_base:
        slots.insert(len(slots) // 2, -1)
    return lens, slots


@pytest.mark.gpu
@pytest.mark.parametrize("module", list(LLAMA8B))
@pytest.mark.parametrize("tokens,adapters", [(1, 1), (64, 64), (256, 17), (2048, 8)])
def test_sgmv_gpu_llama_sizes(module, tokens, adapters):
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    h_in, widths = LLAMA8B[module]
    num_slots, max_rank = 80, 64
    ranks = [int(r) for r in torch.randint(1, max_rank + 1, (num_slots,), generator=gen)]
    lens, seg_slots = _random_batch(tokens, adapters, num_slots, with_base=tokens > 1, gen=gen)
    indptr, slots, _ = make_meta(lens, seg_slots, "cuda")
    n_out = sum(widths)
    offsets = tuple([0] + [sum(widths[: i + 1]) for i in range(len(widths))])
    a, b, slot_ranks, scales = make_pools(num_slots, len(widths), max_rank, h_in, n_out, ranks,
                                          torch.bfloat16, "cuda", gen)
    x = torch.randn(tokens, h_in, generator=gen).to(torch.bfloat16).cuda()
    for y_dtype in (torch.float32, torch.bfloat16):
        y = torch.full((tokens, len(widths), max_rank), float("nan"), dtype=y_dtype, device="cuda")
        sgmv_shrink(x, a, indptr, slots, slot_ranks, y)
        y_ref = sgmv_shrink_ref(x, a, indptr, slots, slot_ranks, torch.empty_like(y, dtype=torch.float32))
        assert rel_err(y, y_ref) < 1e-2
        out0 = torch.randn(tokens, n_out, generator=gen).to(torch.bfloat16).cuda()
        out = out0.clone()
        sgmv_expand(y, b, offsets, indptr, slots, slot_ranks, scales, out)
        out_ref = sgmv_expand_ref(y.float(), b, offsets, indptr, slots, slot_ranks, scales, out0.float())
        assert added_close(out, out0, out_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_sgmv_gpu_cuda_graph_no_sync(pdl, monkeypatch):
    """Captured once, replayed on new metadata of the same shapes: no host sync, right answers;
    with and without programmatic dependent launch (OPENLORA_SGMV_PDL)."""
    monkeypatch.setenv("OPENLORA_SGMV_PDL", "1" if pdl else "0")
    from kernels._common import pdl_enabled
    assert pdl_enabled(torch.device("cuda")) == (pdl and torch.cuda.get_device_capability()[0] >= 9)
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    h_in, widths = LLAMA8B["qkv"]
    num_slots, max_rank, tokens = 32, 16, 64
    n_out = sum(widths)
    offsets = tuple([0] + [sum(widths[: i + 1]) for i in range(len(widths))])
    ranks = [int(r) for r in torch.randint(1, max_rank + 1, (num_slots,), generator=gen)]
    a, b, slot_ranks, scales = make_pools(num_slots, 3, max_rank, h_in, n_out, ranks, torch.bfloat16, "cuda", gen)
    x = torch.randn(tokens, h_in, generator=gen).to(torch.bfloat16).cuda()
    indptr = torch.zeros(17, dtype=torch.int32, device="cuda")
    slots = torch.zeros(16, dtype=torch.int32, device="cuda")
    y = torch.empty(tokens, 3, max_rank, device="cuda")
    out = torch.zeros(tokens, n_out, dtype=torch.bfloat16, device="cuda")

    def step():
        sgmv_shrink(x, a, indptr, slots, slot_ranks, y)
        sgmv_expand(y, b, offsets, indptr, slots, slot_ranks, scales, out)

    step()                                               # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        lens, seg_slots = _random_batch(tokens, 15, num_slots, with_base=True, gen=gen)
        new_indptr, new_slots, _ = make_meta(lens, seg_slots, "cuda")
        indptr.copy_(new_indptr)
        slots.copy_(new_slots)
        out.zero_()
        graph.replay()
        y_ref = sgmv_shrink_ref(x, a, indptr, slots, slot_ranks, torch.empty_like(y))
        out_ref = sgmv_expand_ref(y_ref, b, offsets, indptr, slots, slot_ranks, scales,
                                  torch.zeros(tokens, n_out, device="cuda"))
        assert rel_err(y, y_ref) < 1e-2
        assert rel_err(out, out_ref) < 2e-2


def _run_padded_layout(indptr: list[int], slots: list[int], num_tokens: int, config: dict, gen) -> tuple:
    """Shrink then expand over a padded table (H_in 32; 3 slots of ranks 16, 4, 9 in a rank-16
    pool; fused outputs 24 + 16) -> (y, y_ref, out, want, out before)."""
    indptr = torch.tensor(indptr, dtype=torch.int32, device=DEV)
    slots = torch.tensor(slots, dtype=torch.int32, device=DEV)
    a, b, ranks, scales = make_pools(3, 2, 16, 32, 40, [16, 4, 9], torch.float32, DEV, gen)
    x = torch.randn(num_tokens, 32, generator=gen).to(DEV)
    y = torch.full((num_tokens, 2, 16), float("nan"), device=DEV)
    sgmv_shrink(x, a, indptr, slots, ranks, y, config=config)
    y_ref = sgmv_shrink_ref(x, a, indptr, slots, ranks, torch.empty_like(y))
    out0 = torch.randn(num_tokens, 40, generator=gen).to(DEV)
    out = out0.clone()
    sgmv_expand(y, b, (0, 24, 40), indptr, slots, ranks, scales, out, config=config)
    want = sgmv_expand_ref(y_ref, b, (0, 24, 40), indptr, slots, ranks, scales, out0.clone())
    return y, y_ref, out, want, out0


@pytest.mark.parametrize("block_t", [1, 2, 16])
def test_graph_layout_any_tile(block_t):
    """A decode graph's layout: segments sorted by slot, the table padded with empty segments to
    G = T, padding tokens past the last real segment; any token tile gives the reference."""
    seed = random.randrange(1 << 30)
    num_tokens = 14                                            # 11 real tokens, base first, + 3 padding rows
    indptr, slots = segments_of([-1, 0, 2, 1], [2, 5, 1, 3])
    indptr += [indptr[-1]] * (num_tokens - len(slots))
    slots += [-1] * (num_tokens - len(slots))
    y, y_ref, out, want, out0 = _run_padded_layout(indptr, slots, num_tokens, {"block_t": block_t},
                                                   torch.Generator().manual_seed(seed))
    assert rel_err(y, y_ref) < 1e-4 and rel_err(out, want) < 1e-4, f"seed {seed}"
    assert torch.equal(out[11:], out0[11:]) and torch.equal(out[:2], out0[:2])   # padding and base rows


def test_prompt_graph_layout():
    """A prompt graph's layout (inference_worker/prompt_graphs.py): prefills then 1-token decodes,
    each group sorted by slot, the table padded with empty segments to max_num_seqs, T padded to
    the bucket, token tile 32 and the engine's fixed table width: real rows give the reference,
    padding rows are left alone."""
    seed = random.randrange(1 << 30)
    rng, max_seqs = random.Random(seed), 8
    num_prefills = rng.randint(1, 5)
    prefills = sorted(rng.choice([-1, 0, 1, 2]) for _ in range(num_prefills))
    decodes = sorted(rng.choice([-1, 0, 1, 2]) for _ in range(rng.randint(0, max_seqs - num_prefills)))
    indptr, slots = segments_of(prefills + decodes, [rng.randint(1, 40) for _ in prefills] + [1] * len(decodes))
    real = indptr[-1]
    num_tokens = -(-real // 32) * 32 + rng.choice([0, 5])           # the bucket
    indptr += [real] * (max_seqs - len(slots))
    slots += [-1] * (max_seqs - len(slots))
    config = {"block_t": 32, "block_g": segment_table_width(max_seqs), "rank_bound": 16}
    y, y_ref, out, want, out0 = _run_padded_layout(indptr, slots, num_tokens, config,
                                                   torch.Generator().manual_seed(seed))
    assert rel_err(y[:real], y_ref[:real]) < 1e-4 and rel_err(out[:real], want[:real]) < 1e-4, f"seed {seed}"
    assert torch.equal(out[real:], out0[real:]), f"seed {seed}"         # padding rows untouched


def test_num_tiles_bound_covers_every_layout():
    """The grid bound holds for any segment lengths (empty ones and a tail included), and is
    exactly T for 1-token tiles (no empty programs in a padded decode graph)."""
    import math

    from kernels._common import num_tiles_bound

    rng = random.Random(random.randrange(1 << 30))
    for _ in range(3000):
        num_segs, block_t = rng.randint(0, 70), rng.choice([1, 2, 4, 16, 32, 64])
        lens = [rng.choice([0, 0, 1, 1, 2, 3, 5, 17, 64, 100]) for _ in range(num_segs)]
        tail = rng.choice([0, 0, 1, 3, 20])
        num_tokens = sum(lens) + tail
        tiles = sum(math.ceil(n / block_t) for n in lens) + math.ceil(tail / block_t)
        assert tiles <= num_tiles_bound(num_tokens, num_segs, block_t), (lens, tail, block_t)
        assert num_tiles_bound(num_tokens, num_segs, 1) == num_tokens


@pytest.mark.parametrize("block_t,split_k", [(1, 1), (2, 1), (16, 1), (16, 2)])
def test_rank_bound_skips_padding_rows(block_t, split_k):
    """config rank_bound RB (>= every rank of the step) in a pool of max rank R: y rows [RB, R)
    are never written (NaN stays; the split-K path zeroes y first), rows below RB are exact,
    and the expand over that y (it never reads past a slot's rank) equals the reference."""
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    lens, seg_slots, ranks, R, RB = [3, 1, 4, 2], [1, 0, 3, 2], [4, 2, 8, 1], 32, 8
    indptr, slots, num_tokens = make_meta(lens, seg_slots, DEV)
    a, b, slot_ranks, scales = make_pools(4, 3, R, 40, 56, ranks, torch.float32, DEV, gen)
    x = torch.randn(num_tokens, 40, generator=gen).to(DEV)
    y = torch.full((num_tokens, 3, R), float("nan"), device=DEV)
    sgmv_shrink(x, a, indptr, slots, slot_ranks, y, config={"rank_bound": RB, "block_t": block_t,
                                                             "split_k": split_k})
    y_ref = sgmv_shrink_ref(x, a, indptr, slots, slot_ranks, torch.empty_like(y))
    assert rel_err(y[:, :, :RB], y_ref[:, :, :RB]) < 1e-4, f"seed {seed}"
    assert (y[:, :, RB:].isnan() if split_k == 1 else y[:, :, RB:] == 0).all(), f"seed {seed}"
    out0 = torch.randn(num_tokens, 56, generator=gen).to(DEV)
    out = out0.clone()
    sgmv_expand(y, b, (0, 24, 40, 56), indptr, slots, slot_ranks, scales, out,
                config={"block_t": block_t, "rank_bound": RB})
    want = sgmv_expand_ref(y_ref, b, (0, 24, 40, 56), indptr, slots, slot_ranks, scales, out0.clone())
    assert rel_err(out, want) < 1e-4, f"seed {seed}"
    with pytest.raises(ValueError, match="rank_bound"):
        sgmv_shrink(x, a, indptr, slots, slot_ranks, y, config={"rank_bound": R + 1})
    with pytest.raises(ValueError, match="rank_bound"):
        sgmv_expand(y, b, (0, 24, 40, 56), indptr, slots, slot_ranks, scales, out, config={"rank_bound": R + 1})


def test_expand_picks_blocks_by_rank_bound():
    """1-token tiles read their first B rows early, in 8-row steps at rank bounds up to 16 and 16-row
    steps above (H200 sweep, bench/results/small-sweep-h200.md); without the early reads, steps of ranks
    above 16 take narrow column blocks and 8-row steps (H200 sweep, mixed ranks 8..64), those of rank 16
    the wide blocks. All give the reference's result."""
    from kernels.sgmv_expand import launch_config
    early = launch_config(64, 46, 28672, 64, torch.bfloat16, {"block_t": 1, "rank_bound": 16})
    early_wide = launch_config(64, 46, 28672, 64, torch.bfloat16, {"block_t": 1, "rank_bound": 64})
    wide = launch_config(64, 46, 28672, 64, torch.bfloat16, {"block_t": 1, "rank_bound": 16, "early": False})
    narrow = launch_config(64, 46, 28672, 64, torch.bfloat16, {"block_t": 1, "rank_bound": 64, "early": False})
    assert (early["early"], early["block_n"], early["block_r"], early["num_warps"]) == (True, 512, 8, 2)
    assert (early_wide["early"], early_wide["block_r"]) == (True, 16)
    assert (wide["early"], narrow["early"]) == (False, False)
    assert (wide["block_n"], narrow["block_n"], narrow["block_r"]) == (1024, 256, 8)
    assert launch_config(64, 46, 28672, 64, torch.bfloat16)["block_r"] == 16     # no bound: the pool's R
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    ranks = [8, 64, 16, 32, 5]
    indptr, slots, num_tokens = make_meta([1, 2, 1, 1, 1], [0, 1, 2, 3, 4], DEV)
    _, b, slot_ranks, scales = make_pools(5, 2, 64, 8, 300, ranks, torch.float32, DEV, gen)
    y = torch.randn(num_tokens, 2, 64, generator=gen).to(DEV)
    out0 = torch.randn(num_tokens, 300, generator=gen).to(DEV)
    want = sgmv_expand_ref(y, b, (0, 100, 300), indptr, slots, slot_ranks, scales, out0.clone())
    for early in (True, False):
        out = out0.clone()
        sgmv_expand(y, b, (0, 100, 300), indptr, slots, slot_ranks, scales, out,
                    config={"block_t": 1, "rank_bound": 64, "early": early})
        assert rel_err(out, want) < 1e-4, f"seed {seed} early {early}"


def test_shrink_halves_rows_when_programs_are_few():
    """1-token tiles of fewer than 300 4-row blocks take 2 rows a program and 4 warps (H200 sweep:
    o and down at 64 x 64); many blocks (qkv at 64 tokens) keep 4 rows; "halve": False restores the
    4-row rule. The 2-row programs give the reference's result, odd rank bound and rank 0 included."""
    from kernels.sgmv_shrink import launch_config

    def sizes(num_mods, h_in, **cfg):
        c = launch_config(64, 64, num_mods, 16, h_in, True, {"block_t": 1, **cfg})
        return c["block_n"], c["block_k"], c["split_k"], c["num_warps"]
    assert sizes(1, 4096) == (2, 2048, 1, 4)                       # o
    assert sizes(1, 14336) == (2, 2048, 1, 4)                      # down
    assert sizes(1, 14336, halve=False) == (4, 1024, 1, 8)
    assert sizes(3, 4096) == sizes(3, 4096, halve=False) == (4, 512, 1, 4)     # qkv: 768 blocks
    # 2-token tiles too: 16 tokens of one adapter (qkv: 96 blocks), gate/up at 64 x 8 (256); not qkv there (384)
    two = {"block_t": 2}
    assert launch_config(16, 1, 3, 16, 4096, True, two)["block_n"] == 2
    assert launch_config(64, 8, 2, 16, 4096, True, two)["block_n"] == 2
    assert launch_config(64, 8, 3, 16, 4096, True, two)["block_n"] == 4
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    ranks, RB = [5, 0, 3, 1], 5
    indptr, slots, num_tokens = make_meta([1, 1, 1, 1, 1], [0, 1, 2, 3, 0], DEV)
    a, _, slot_ranks, _ = make_pools(4, 2, 8, 72, 8, ranks, torch.float32, DEV, gen)
    x = torch.randn(num_tokens, 72, generator=gen).to(DEV)
    y = torch.full((num_tokens, 2, 8), float("nan"), device=DEV)
    cfg = launch_config(num_tokens, 5, 2, 8, 72, True, {"rank_bound": RB})
    assert (cfg["block_t"], cfg["block_n"], cfg["can_skip"]) == (1, 2, False)
    sgmv_shrink(x, a, indptr, slots, slot_ranks, y, config={"rank_bound": RB})
    y_ref = sgmv_shrink_ref(x, a, indptr, slots, slot_ranks, torch.empty_like(y))
    assert rel_err(y[:, :, :RB], y_ref[:, :, :RB]) < 1e-4, f"seed {seed}"


def test_pdl_switch_and_never_on_cpu(monkeypatch):
    """PDL: on by default on Hopper for decode tiles (never for long ones), off with OPENLORA_SGMV_PDL=0,
    never without CUDA."""
    from kernels._common import gdc_wait, launch_options, pdl_enabled
    from kernels.sgmv_expand import launch_config as expand_config
    from kernels.sgmv_shrink import launch_config as shrink_config
    monkeypatch.delenv("OPENLORA_SGMV_PDL", raising=False)
    # launches ask for it on decode tiles only, unless their config says otherwise
    assert shrink_config(64, 64, 3, 16, 4096, True)["pdl"] and expand_config(64, 64, 6144, 16, torch.bfloat16)["pdl"]
    assert not shrink_config(2048, 8, 3, 16, 4096, True)["pdl"]
    assert not expand_config(2048, 8, 6144, 16, torch.bfloat16)["pdl"]
    dot_decode = {"block_t": 16, "block_n": 16, "block_k": 128, "pdl": True}
    assert shrink_config(64, 64, 3, 16, 4096, True, dot_decode)["pdl"]
    assert not pdl_enabled(torch.device("cpu")) and launch_options(torch.device("cpu")) == {}
    if torch.cuda.is_available():
        hopper = torch.cuda.get_device_capability()[0] >= 9 and gdc_wait is not None
        assert pdl_enabled(torch.device("cuda")) == hopper
        assert ("launch_pdl" in launch_options(torch.device("cuda"))) == hopper
        assert launch_options(torch.device("cuda"), pdl=False) == {}
        monkeypatch.setenv("OPENLORA_SGMV_PDL", "0")
        assert not pdl_enabled(torch.device("cuda")) and launch_options(torch.device("cuda")) == {}
