"""bench/tile_ab.py compares today's token tiles with the rule before them: that rule, as it was."""
import importlib

from kernels.tiles import pick_block_t


def test_old_rule_and_where_today_differs():
    # imported in the test, not at collection: bench.tile_ab imports the Triton launchers, which must be
    # decorated after tests/kernels/conftest.py asks for the interpreter (TRITON_INTERPRET)
    old_tile = importlib.import_module("bench.tile_ab").old_tile
    assert [old_tile(64, g) for g in (64, 42, 8, 6, 4, 1)] == [1, 2, 2, 2, 16, 64]
    assert old_tile(2048, 8) == pick_block_t(2048, 8) == 64
    assert (old_tile(64, 8), pick_block_t(64, 8)) == (2, 16)          # 8 tokens a segment: dot tiles now
    assert (old_tile(64, 1), pick_block_t(64, 1)) == (64, 16)         # a small step: 16 at most now
