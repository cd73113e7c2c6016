"""The chained launch (kernels/sgmv_chain.py) against sgmv_shrink_ref then sgmv_expand_ref.

CPU: interpreted (programs run one after another, in ticket order). GPU (marked): Llama-3-8B
sizes in bf16, eagerly and replayed in a CUDA graph, where the in-kernel waits really race.
"""
from __future__ import annotations

import pytest
import torch

from kernels.reference import sgmv_expand_ref, sgmv_shrink_ref
from kernels.sgmv_chain import sgmv_chain, sync_len
from tests.kernels.helpers import added_close, make_meta, make_pools

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# name -> (segment lengths, segment slots (-1 base), slot ranks, max rank)
SCENARIOS = {
    "every_token_own_adapter": ([1] * 7, [0, 3, 1, 5, 2, 4, 6], [8, 1, 5, 8, 3, 7, 2], 8),
    "short_segments_and_base": ([3, 2, 4, 1, 5, 0], [4, 0, -1, 2, 1, 3], [2, 16, 9, 5, 13], 16),
    "all_base": ([1, 1, 1], [-1, -1, -1], [8], 8),
    "one_adapter_for_all": ([6], [1], [3, 5], 8),
}


def _case(name, num_mods, widths, h_in, dtype, config=None, seed=0):
    seg_lens, seg_slots, ranks, max_rank = SCENARIOS[name]
    gen = torch.Generator().manual_seed(seed)
    indptr, slots, num_tokens = make_meta(seg_lens, seg_slots, DEV)
    offsets = tuple([0] + [sum(widths[: i + 1]) for i in range(len(widths))])
    a, b, slot_ranks, scales = make_pools(len(ranks), num_mods, max_rank, h_in, sum(widths), ranks, dtype, DEV, gen)
    x = torch.randn(num_tokens, h_in, generator=gen).to(dtype).to(DEV)
    out0 = torch.randn(num_tokens, sum(widths), generator=gen).to(dtype).to(DEV)
    y_ref = sgmv_shrink_ref(x.double(), a.double(), indptr, slots, slot_ranks,
                            torch.empty(num_tokens, num_mods, max_rank, dtype=torch.float64, device=DEV))
    ref = sgmv_expand_ref(y_ref, b.double(), offsets, indptr, slots, slot_ranks, scales, out0.double())
    return (x, a, b, offsets, indptr, slots, slot_ranks, scales), out0, ref, max_rank


def _launch(args, out0, max_rank, sync, config):
    x, a, b, offsets, indptr, slots, slot_ranks, scales = args
    y = torch.full((x.shape[0], a.shape[1], max_rank), float("nan"), dtype=torch.float32, device=DEV)
    out = out0.clone()
    sgmv_chain(x, a, y, b, offsets, indptr, slots, slot_ranks, scales, out, sync, config=config)
    return out


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("block_t", [1, 2])
def test_chain_matches_shrink_then_expand(name, block_t):
    args, out0, ref, max_rank = _case(name, 3, [40, 24, 24], 96, torch.float32)
    config = {"block_t": block_t, "expand": {"block_n": 16}}
    sync = torch.zeros(sync_len(out0.shape[0], len(SCENARIOS[name][0]), block_t), dtype=torch.int32, device=DEV)
    for _ in range(2):                    # the second launch reuses the counters the first zeroed
        out = _launch(args, out0, max_rank, sync, config)
        assert added_close(out, out0, ref, tol=1e-4), name
        assert not sync.any(), "the last program leaves the counters zeroed"


def test_chain_split_k_and_two_blocks_a_program():
    """The down projection's split-K shrink (atomics into a zeroed y) and expand programs that
    own two column blocks each: the ready count covers every split."""
    args, out0, ref, max_rank = _case("short_segments_and_base", 1, [64], 160, torch.float32)
    config = {"block_t": 2, "shrink": {"split_k": 3, "block_k": 16}, "expand": {"block_n": 16, "nb_per_prog": 2}}
    sync = torch.zeros(64, dtype=torch.int32, device=DEV)
    out = _launch(args, out0, max_rank, sync, config)
    assert added_close(out, out0, ref, tol=1e-4)


def test_chain_rejects_a_short_sync_buffer_and_long_tiles():
    args, out0, _, max_rank = _case("one_adapter_for_all", 1, [32], 64, torch.float32)
    with pytest.raises(ValueError, match="sync holds"):
        _launch(args, out0, max_rank, torch.zeros(2, dtype=torch.int32, device=DEV), {"block_t": 1})
    with pytest.raises(ValueError, match="decode tiles"):
        _launch(args, out0, max_rank, torch.zeros(64, dtype=torch.int32, device=DEV), {"block_t": 16})


@pytest.mark.gpu
@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
def test_chain_gpu_llama_sizes_in_a_graph(group):
    """64 tokens, each its own rank-16 adapter (and a few base tokens), bf16: eager and 20 graph
    replays give the reference's result every time (a missed wait would read a stale y)."""
    h_in, widths = {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336]),
                    "down": (14336, [4096])}[group]
    num_tokens = 64
    slots = [(-1 if t % 16 == 5 else t) for t in range(num_tokens)]
    gen = torch.Generator().manual_seed(1)
    a, b, slot_ranks, scales = make_pools(num_tokens, len(widths), 64, h_in, sum(widths),
                                          [16] * num_tokens, torch.bfloat16, DEV, gen)
    indptr, seg_slots, _ = make_meta([1] * num_tokens, slots, DEV)
    offsets = tuple([0] + [sum(widths[: i + 1]) for i in range(len(widths))])
    x = torch.randn(num_tokens, h_in, generator=gen).to(torch.bfloat16).to(DEV)
    out0 = torch.randn(num_tokens, sum(widths), generator=gen).to(torch.bfloat16).to(DEV)
    y_ref = sgmv_shrink_ref(x.float(), a.float(), indptr, seg_slots, slot_ranks,
                            torch.empty(num_tokens, len(widths), 64, device=DEV))
    ref = sgmv_expand_ref(y_ref, b.float(), offsets, indptr, seg_slots, slot_ranks, scales, out0.float())
    y = torch.empty(num_tokens, len(widths), 64, device=DEV)
    sync = torch.zeros(sync_len(num_tokens, num_tokens, 1), dtype=torch.int32, device=DEV)
    out = out0.clone()
    config = {"block_t": 1, "rank_bound": 16}

    def step():
        out.copy_(out0)
        sgmv_chain(x, a, y, b, offsets, indptr, seg_slots, slot_ranks, scales, out, sync, config=config)

    step()
    torch.cuda.synchronize()
    assert added_close(out, out0, ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(20):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert added_close(out, out0, ref)
    assert not sync.any()
