"""bench/small_sweep.py's grids and its pick of each op's best config (CPU: launch_config only)."""
import importlib

import pytest
import torch


def test_grids_are_valid_launch_configs():
    # imported in the test, not at collection: the sweep imports the Triton launchers, which must be imported
    # after the kernels' conftest picks the interpreter
    sweep = importlib.import_module("bench.small_sweep")
    bk = importlib.import_module("bench.kernels")
    shrink_lc = importlib.import_module("kernels.sgmv_shrink").launch_config
    expand_lc = importlib.import_module("kernels.sgmv_expand").launch_config
    for text in sweep.CASES:
        tokens, adapters, rank = sweep.parse_case(text)
        shrinks, expands = sweep.grids(tokens, adapters, rank)
        assert shrinks and expands
        for h_in, widths in bk.GROUPS.values():
            for cfg in shrinks:
                shrink_lc(tokens, adapters, len(widths), rank, h_in, True, {"block_g": 128, **cfg})
            for cfg in expands:
                expand_lc(tokens, adapters, sum(widths), rank, torch.bfloat16, {"block_g": 128, **cfg})
    # no tile longer than a segment; dot tiles only from 4 tokens a segment; loop-free rank-64 dot tiles
    assert {c["block_t"] for c in sweep.shrink_grid(1, 1, 64)} == {1}
    assert {c["block_t"] for c in sweep.shrink_grid(64, 8, 16)} == {1, 2, 4, 16}
    assert any(c["block_t"] == 16 and c["block_r"] == 64 and c["prefetch"] for c in sweep.expand_grid(64, 1, 64))
    assert not any(c["block_r"] > 16 for c in sweep.expand_grid(16, 1, 16))


def test_best_per_op_keeps_only_winning_overrides():
    sweep = importlib.import_module("bench.small_sweep")
    row = {"qkv.shrink": {"all": [(5.0, None), (4.0, {"block_n": 2})]},
           "qkv.expand": {"all": [(3.0, None), (float("inf"), {"block_n": 64})]}}
    assert sweep.best_per_op(row) == ({"qkv": {"block_n": 2}}, {})



@pytest.mark.parametrize("script,op", [("bench.shrink_steps", "shrink"), ("bench.expand_blocks", "expand")])
def test_one_op_grids_are_valid_launch_configs(script, op):
    """bench/shrink_steps.py and bench/expand_blocks.py sweep one op each: every config a valid launch."""
    grids = importlib.import_module(script)
    sweep = importlib.import_module("bench.small_sweep")
    bk = importlib.import_module("bench.kernels")
    launch_config = importlib.import_module(f"kernels.sgmv_{op}").launch_config
    for text in grids.CASES:
        tokens, adapters, rank = sweep.parse_case(text)
        shrinks, expands = grids.grids(tokens, adapters, rank)
        cfgs, others = (shrinks, expands) if op == "shrink" else (expands, shrinks)
        assert cfgs and not others
        for cfg in cfgs:
            if op == "shrink":
                launch_config(tokens, adapters, 3, rank, bk.HIDDEN, True, {"block_g": 128, **cfg})
            else:
                launch_config(tokens, adapters, bk.INTER * 2, rank, torch.bfloat16, {"block_g": 128, **cfg})


def test_one_op_grids_fit_their_segments_and_shared_memory():
    """No token tile longer than a segment, no shrink config whose stages overflow ~200 KB of shared memory."""
    steps = importlib.import_module("bench.shrink_steps")
    blocks = importlib.import_module("bench.expand_blocks")
    parse_case = importlib.import_module("bench.small_sweep").parse_case
    shrinks = [c for text in steps.CASES for c in steps.grids(*parse_case(text))[0]]
    assert all((c["block_t"] + c["block_n"]) * c["block_k"] * 2 * c["num_stages"] <= 200 << 10 for c in shrinks)
    assert {c["block_t"] for c in steps.grids(64, 8, 64)[0]} == {16}
    assert {c["block_k"] for c in steps.grids(256, 1, 64)[0] if c["block_t"] == 64} == {128, 256, 512}
    assert {c["block_t"] for c in blocks.grids(256, 4, 64)[1]} == {64}
    assert {c["nb_per_prog"] for c in blocks.grids(256, 1, 16)[1]} == {1, 2, 4}
