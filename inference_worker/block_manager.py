"""Paged KV cache bookkeeping: fixed-size blocks, a free list, and per-sequence block tables.

Only ids move here; the cache tensors ([num_blocks, block_size, Hkv, D] per layer) live
in the model runner. A sequence of n tokens holds ceil(n / block_size) blocks.
"""
from __future__ import annotations

from inference_worker.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, seq: Sequence) -> bool:
        """Room for a prefill of all the sequence's tokens."""
        return blocks_for(seq.num_tokens, self.block_size) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id} already holds blocks")
        needed = blocks_for(seq.num_tokens, self.block_size)
        if needed > len(self._free):
            raise RuntimeError("allocate without can_allocate")
        seq.block_table = [self._free.pop() for _ in range(needed)]

    def can_append(self, seq: Sequence) -> bool:
        """Room for the decode step's one new token (a new block only at a block boundary)."""
        return self._blocks_missing(seq) <= len(self._free)

    def append_slot(self, seq: Sequence) -> None:
        missing = self._blocks_missing(seq)
        if missing > len(self._free):
            raise RuntimeError("append_slot without can_append")
        seq.block_table.extend(self._free.pop() for _ in range(missing))

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_cached = 0

    def _blocks_missing(self, seq: Sequence) -> int:
        return max(0, blocks_for(seq.num_tokens, self.block_size) - len(seq.block_table))
