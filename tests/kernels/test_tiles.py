"""The token-tile rules of the SGMV kernels (kernels/tiles.py) and how a step's LoRA metadata applies
the shrink's own rule per layer width (inference_worker/lora/metadata.py)."""
import pytest
import torch

from inference_worker.lora.metadata import LoraBatchMeta
from kernels.sgmv_expand import launch_config as expand_config
from kernels.sgmv_shrink import launch_config as shrink_config
from kernels.tiles import DOT_TILE, SMALL_SHRINK_TILE, pick_block_t, shrink_tile


def test_pick_block_t_by_tokens_per_segment():
    # 1 token a segment: 1; under 4: 2; from 4: dot tiles, of more than 16 only in steps of 256 tokens
    assert [pick_block_t(64, g) for g in (64, 42, 32, 17, 16, 8, 1)] == [1, 2, 2, 2, 16, 16, 16]
    assert [pick_block_t(256, g) for g in (64, 16, 8, 4, 1)] == [16, 16, 32, 64, 64]
    assert pick_block_t(2048, 8) == 64 and pick_block_t(0, 0) == 1


def test_shrink_tile_keeps_dot_tiles_for_large_steps_and_long_inputs():
    assert shrink_tile(1, 64, 4096) == 1 and shrink_tile(2, 64, 14336) == 2          # decode tiles stay
    assert shrink_tile(16, 64, 4096) == SMALL_SHRINK_TILE == 2                      # small step, short H_in
    assert shrink_tile(16, 16, 14336) == 2                                          # too few tokens even for down
    assert shrink_tile(16, 64, 14336) == 16                                         # down from 64 tokens
    assert shrink_tile(16, 256, 4096) == 16 and shrink_tile(64, 2048, 4096) == 64   # many tokens
    # ranks past 16: the expand's dot tile in decode-sized steps (16, or up to 64 for long segments)
    assert shrink_tile(16, 16, 4096, 64) == 16 and shrink_tile(64, 256, 4096, 32) == 64
    assert shrink_tile(16, 64, 4096, 16) == 2 and shrink_tile(2, 64, 4096, 64) == 2
    assert shrink_tile(64, 2048, 4096, 64) == 64                                     # prompt steps: as at rank 16


def test_launchers_default_to_the_rules():
    """The shrink of 64 tokens x 8 adapters: 2-token tiles at H_in 4096, dot tiles at 14336; the expand
    of the same step: dot tiles. A prefill keeps 64-token dot tiles for both."""
    assert shrink_config(64, 8, 3, 16, 4096, True)["block_t"] == 2
    assert shrink_config(64, 8, 1, 16, 14336, True)["block_t"] == DOT_TILE
    assert expand_config(64, 8, 6144, 16, torch.bfloat16)["block_t"] == DOT_TILE
    assert shrink_config(2048, 8, 3, 16, 4096, True)["block_t"] == 64
    assert expand_config(2048, 8, 6144, 16, torch.bfloat16)["block_t"] == 64


def _blocks(cfg, *keys):
    return tuple(cfg[k] for k in keys)


def test_dot_tile_decode_defaults():
    """Decode steps on 16-token tiles (bench/results/tile-sweep-dot-h200.md), by T and the tile only (a
    decode graph pads G). The expand of ranks <= 16: the loop-free path, one block of 256 columns a
    program; ranks up to 64: all rows in one step (loop-free too); prompt tiles of 32 tokens: the loop-free path too, not of 64. The shrink at H_in <= 8192: 4 splits, 4 stages,
    32+ columns; down's as before."""
    keys = ("block_n", "nb_per_prog", "prefetch")
    for n in (6144, 28672):
        for tokens, adapters in ((256, 64), (64, 8), (256, 16), (256, 256)):
            assert _blocks(expand_config(tokens, adapters, n, 16, torch.bfloat16, {"block_t": 16}), *keys) == (256, 1, True)
    wide = expand_config(256, 64, 6144, 64, torch.bfloat16)                                  # a rank-64 pool: 64 rows,
    assert (wide["block_r"], wide["block_n"], wide["prefetch"]) == (64, 256, True)          # one loop-free step
    assert expand_config(256, 64, 6144, 64, torch.bfloat16, {"rank_bound": 16})["block_r"] == 16  # rank-16 adapters
    assert not expand_config(256, 64, 6144, 128, torch.bfloat16)["prefetch"]                 # rank 128: a rank loop
    # long segments in a decode-sized step: 64-token tiles, loop-free, 128 columns (256 for gate/up)
    for rank, rows in ((64, 64), (16, 16), (8, 16)):
        for n, cols in ((6144, 128), (28672, 256)):
            long = expand_config(256, 1, n, rank, torch.bfloat16)
            assert _blocks(long, "block_t", "block_r", "block_n", "prefetch", "early_dot") == (64, rows, cols, True, True)
    assert not expand_config(2048, 8, 6144, 16, torch.bfloat16)["prefetch"]                  # 64-token tiles
    assert expand_config(2048, 8, 6144, 16, torch.bfloat16, {"block_t": 32})["prefetch"]     # the prompt graphs'
    assert not expand_config(2048, 8, 6144, 64, torch.bfloat16, {"block_t": 32})["prefetch"]
    keys = ("block_n", "split_k", "num_stages")
    for adapters in (64, 16, 1, 256):
        assert _blocks(shrink_config(256, adapters, 1, 16, 4096, True, {"block_t": 16}), *keys) == (32, 4, 4)
        assert _blocks(shrink_config(256, adapters, 3, 16, 4096, True, {"block_t": 16}), *keys) == (64, 4, 4)
    assert _blocks(shrink_config(256, 64, 1, 16, 14336, True), *keys) == (16, 16, 3)        # down: as before
    assert _blocks(shrink_config(2048, 8, 3, 16, 4096, True), *keys) == (64, 4, 3)          # prompt tiles: as before


def test_wide_rank_decode_shrink_fills_one_wave():
    """Ranks past 16 on 16-token tiles (bench/results/small-sweep-h200.md): wider column blocks as tiles
    grow, H_in split so that tiles x column blocks x splits is about 128 programs, 4 to 16 splits."""
    keys = ("block_t", "block_n", "split_k", "num_stages")
    assert _blocks(shrink_config(16, 1, 3, 64, 4096, True), *keys) == (16, 16, 8, 4)      # 12 blocks x 8
    assert _blocks(shrink_config(64, 8, 2, 64, 4096, True), *keys) == (16, 32, 8, 4)      # 4 x 4 x 8
    assert _blocks(shrink_config(64, 8, 1, 64, 14336, True), *keys) == (16, 32, 16, 4)    # 4 x 2 x 16
    assert _blocks(shrink_config(256, 64, 3, 64, 4096, True), *keys) == (16, 64, 4, 4)    # 16 x 3 x 4 (not 2)
    assert _blocks(shrink_config(256, 16, 1, 64, 4096, True), *keys) == (16, 64, 8, 4)
    # long segments (256 tokens of one adapter): 64-token tiles, 3 stages, 512+ of H_in a split
    assert _blocks(shrink_config(256, 1, 3, 64, 4096, True), *keys) == (64, 32, 4, 3)     # 4 x 6 x 4
    assert _blocks(shrink_config(256, 1, 2, 64, 4096, True), *keys) == (64, 32, 8, 3)     # 4 x 4 x 8
    assert _blocks(shrink_config(256, 1, 1, 64, 4096, True), *keys) == (64, 32, 8, 3)     # 16 by the wave
    assert _blocks(shrink_config(256, 1, 1, 64, 14336, True), *keys) == (64, 32, 16, 3)
    # K steps of 256 for down's long H_in on these tiles, 128 elsewhere
    assert shrink_config(256, 1, 1, 64, 14336, True)["block_k"] == 256
    assert shrink_config(256, 1, 3, 64, 4096, True)["block_k"] == 128
    assert shrink_config(64, 8, 1, 64, 14336, True)["block_k"] == 128
    assert shrink_config(64, 8, 3, 64, 4096, False)["split_k"] == 1                       # no fp32 y: no split
    assert shrink_config(64, 8, 3, 64, 4096, True, {"rank_bound": 16})["block_t"] == 2    # rank-16 adapters


def test_pdl_for_decode_sized_steps():
    """Every launch of a step of up to 256 tokens asks for PDL, tl.dot tiles too; prompt steps' do not."""
    assert expand_config(64, 8, 6144, 16, torch.bfloat16)["pdl"] and shrink_config(64, 8, 1, 16, 14336, True)["pdl"]
    assert expand_config(256, 1, 6144, 16, torch.bfloat16)["pdl"]
    assert not expand_config(2048, 8, 6144, 16, torch.bfloat16)["pdl"]
    assert not shrink_config(2048, 8, 3, 16, 4096, True)["pdl"]
    assert shrink_config(2048, 2048, 3, 16, 4096, True)["pdl"]                            # 1-token tiles: always


def _meta(**kw) -> LoraBatchMeta:
    i32 = {"dtype": torch.int32}
    return LoraBatchMeta(True, torch.zeros(2, **i32), torch.zeros(1, **i32), torch.zeros(1, **i32),
                         torch.zeros(1), **kw)


def test_meta_shrink_config_per_layer_width():
    """A decode graph of tile 16 (the expand's): the shrink runs 2-token tiles at H_in 4096 under 256
    rows and keeps 16 for down (H_in 14336) from 64 rows; a prompt graph's own shrink tile and an
    eager step's (none: the launcher picks) are left alone."""
    graph = _meta(block_t=16, rank_bound=16)
    assert graph.shrink_config_for(64, 4096) == {"block_t": 2, "rank_bound": 16}
    assert graph.shrink_config_for(64, 14336) is graph.shrink_config == {"block_t": 16, "rank_bound": 16}
    assert graph.shrink_config_for(256, 4096)["block_t"] == 16
    assert _meta(block_t=16, rank_bound=64).shrink_config_for(64, 4096)["block_t"] == 16      # wide ranks
    assert _meta(block_t=2).shrink_config_for(64, 4096)["block_t"] == 2
    prompt = _meta(block_t=32, shrink_block_t=64, block_g=128)
    assert prompt.shrink_config_for(48, 4096) == {"block_t": 64, "block_g": 128, "rank_bound": None}
    assert "block_t" not in _meta(block_g=128).shrink_config_for(64, 4096)


def test_early_weight_reads():
    """1-token tiles read their first B rows before the PDL wait: up to rank 16 all rows of 512 columns (8 rows
    a step on gate/up's 28672 columns); past it 16 rows, or all rows (up to 64) of 128 columns in steps of up to
    16 tokens. The loop-free dot path
    reads its first block's B early where the launch asks for PDL (decode-sized steps) and has up to 32 token
    tiles, not in prompt steps; OPENLORA_SGMV_EARLY=0 turns both off."""
    keys = ("early", "block_r", "block_n")
    assert _blocks(expand_config(64, 64, 6144, 16, torch.bfloat16), *keys) == (True, 16, 512)
    assert _blocks(expand_config(64, 64, 4096, 8, torch.bfloat16), *keys) == (True, 8, 512)
    assert _blocks(expand_config(64, 64, 28672, 16, torch.bfloat16), *keys) == (True, 8, 512)
    assert _blocks(expand_config(64, 64, 6144, 64, torch.bfloat16), *keys) == (True, 16, 512)
    assert _blocks(expand_config(16, 16, 6144, 64, torch.bfloat16), *keys) == (True, 64, 128)
    assert _blocks(expand_config(1, 1, 6144, 128, torch.bfloat16), *keys) == (True, 64, 128)      # a 2-step loop
    assert expand_config(64, 8, 6144, 16, torch.bfloat16)["early_dot"]
    assert expand_config(256, 16, 6144, 16, torch.bfloat16)["early_dot"]                           # 31 tiles
    assert not expand_config(256, 64, 6144, 16, torch.bfloat16)["early_dot"]                       # 76
    assert not expand_config(64, 8, 6144, 16, torch.bfloat16, {"pdl": False})["early_dot"]
    prompt = expand_config(2048, 8, 6144, 16, torch.bfloat16, {"block_t": 32})
    assert prompt["prefetch"] and not prompt["early_dot"]
    assert not expand_config(64, 8, 6144, 16, torch.bfloat16, {"early_dot": False})["early_dot"]


def test_early_reads_off_by_environment(monkeypatch):
    monkeypatch.setenv("OPENLORA_SGMV_EARLY", "0")
    assert not expand_config(64, 8, 6144, 16, torch.bfloat16, {"block_g": 64})["early_dot"]
    assert not expand_config(16, 16, 6144, 64, torch.bfloat16, {"block_g": 256})["early"]


def test_split_k_zeroes_y_by_a_pdl_kernel_in_decode_steps():
    """A split-K shrink's y is zeroed by a kernel where the launch asks for PDL (a memset node would break
    the step's PDL chain), by a memset in prompt steps and in 17-128-token steps; no zeroing without a split."""
    assert shrink_config(256, 1, 3, 64, 4096, True)["zero"] == "kernel"
    assert shrink_config(1, 1, 1, 16, 14336, True)["zero"] == "kernel"
    assert shrink_config(64, 1, 1, 16, 14336, True)["zero"] == "memset"
    assert shrink_config(2048, 8, 3, 16, 4096, True)["zero"] == "memset"
    assert shrink_config(256, 1, 3, 64, 4096, True, {"zero": "memset"})["zero"] == "memset"
    assert shrink_config(256, 1, 3, 64, 4096, True, {"split_k": 1})["zero"] is None
    with pytest.raises(ValueError, match="zero"):
        shrink_config(256, 1, 3, 64, 4096, True, {"zero": "bzero"})
