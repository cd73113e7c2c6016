"""BlockManager: block tables grow a block at a time; freeing returns every block."""
from __future__ import annotations

import pytest

from inference_worker.block_manager import BlockManager, blocks_for
from inference_worker.interfaces import EngineRequest, SamplingConfig
from inference_worker.sequence import Sequence


def seq_of(num_prompt: int) -> Sequence:
    return Sequence(EngineRequest("r", list(range(num_prompt)), SamplingConfig()), ticket=None, generator=None)


def test_blocks_for():
    assert [blocks_for(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


def test_allocate_append_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = seq_of(5)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 2 and bm.num_free == 2
    for _ in range(3):                          # tokens 6..8 still fit block 2
        seq.output_token_ids.append(0)
        assert bm.can_append(seq)
        bm.append_slot(seq)
    assert len(seq.block_table) == 2
    seq.output_token_ids.append(0)              # token 9: a third block
    bm.append_slot(seq)
    assert len(seq.block_table) == 3 and bm.num_used == 3
    seq.num_cached = 8
    bm.free(seq)
    assert bm.num_free == 4 and seq.block_table == [] and seq.num_cached == 0


def test_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    big = seq_of(9)
    assert not bm.can_allocate(big)
    with pytest.raises(RuntimeError):
        bm.allocate(big)
    a = seq_of(8)
    bm.allocate(a)
    a.output_token_ids.append(1)
    assert not bm.can_append(a)
    with pytest.raises(RuntimeError):
        bm.append_slot(a)


def test_distinct_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    seqs = [seq_of(3), seq_of(4), seq_of(1)]
    for s in seqs:
        bm.allocate(s)
    ids = [b for s in seqs for b in s.block_table]
    assert len(ids) == len(set(ids)) == 5
