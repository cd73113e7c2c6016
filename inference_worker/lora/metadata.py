"""LoraBatchMeta: which adapter slot each token of a step uses.

The model runner lays out each step's sequences grouped by slot (prefills sorted
by slot, then decodes sorted by slot), so tokens of one slot are contiguous and
no permutation is needed; a slot may own two segments (one among the prefills,
one among the decodes). Segments of the base model have slot -1 and get no LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from kernels.tiles import SMALL_SHRINK_TILE, shrink_tile


@dataclass
class LoraBatchMeta:
    has_lora: bool                        # host flag: some segment has a slot (else skip all LoRA work)
    seg_indptr: torch.Tensor              # [G+1] int32 token range of segment g: seg_indptr[g]:seg_indptr[g+1]
    seg_slots: torch.Tensor               # [G] int32 slot of segment g, -1 = base model
    slot_ranks: torch.Tensor              # [S] int32 true rank of each slot (the pool's, not per step)
    slot_scales: torch.Tensor             # [S] float32 alpha/r (or alpha/sqrt(r)) of each slot
    # token tile of the SGMV kernels; None = the kernels pick it from T and G. A decode CUDA graph
    # fixes it at capture (its grid depends on it), so the runner picks the graph whose tile
    # suits the step's tokens per segment.
    block_t: int | None = None
    # the shrink's token tile where it differs from block_t (None = block_t): prompt graphs
    # (inference_worker/prompt_graphs.PROMPT_SHRINK_TILE)
    shrink_block_t: int | None = None
    # >= the rank of every adapter in the step (None = the pool's max rank): the shrink then
    # launches no programs for rank rows past it (kernels/sgmv_shrink.py); a decode graph fixes
    # it at capture too (cuda_graphs.rank_bounds)
    rank_bound: int | None = None
    # the SGMV segment-table width (a power of 2 >= G + 2; None = the kernels' own): eager steps
    # fix it for the engine, so any G shares one compiled variant (inference_worker/lora/warmup.py)
    block_g: int | None = None
    # A second CUDA stream for the shrinks of a captured step (None = all on the current stream):
    # each runs beside its base matmul (lora/layers.py says why). Only in CUDA graphs: eagerly,
    # the fork and join would cost host time.
    side_stream: Any = None

    @cached_property
    def sgmv_config(self) -> dict:
        """The config of this step's LoRA launches: built once a step, not once a layer."""
        return sgmv_config(self.block_t, self.block_g, self.rank_bound)

    @cached_property
    def shrink_config(self) -> dict:
        """The shrinks' config: sgmv_config, with the shrink's own token tile when it has one."""
        if self.shrink_block_t is None:
            return self.sgmv_config
        return sgmv_config(self.shrink_block_t, self.block_g, self.rank_bound)

    def shrink_config_for(self, num_tokens: int, h_in: int) -> dict:
        """The config of the shrink of a layer of input width h_in over num_tokens rows: shrink_config,
        but a decode graph's dot tile gives way to 2-token tiles where the step is too small for the
        dot path (kernels.tiles.shrink_tile: < 256 tokens, or < 64 for down's long H_in, at rank bounds
        up to 16)."""
        if self.shrink_block_t is not None or self.block_t is None:
            return self.shrink_config
        if shrink_tile(self.block_t, num_tokens, h_in, self.rank_bound) == self.block_t:
            return self.shrink_config
        return self._small_shrink_config

    @cached_property
    def _small_shrink_config(self) -> dict:
        return sgmv_config(SMALL_SHRINK_TILE, self.block_g, self.rank_bound)


def sgmv_config(block_t: int | None, block_g: int | None, rank_bound: int | None) -> dict:
    """The launch choices a step fixes, as the SGMV launchers take them (kernels/sgmv_*.py:
    launch_config; None = the launcher picks): the token tile, the segment-table width, and the
    rank bound (the shrink launches no programs past it, the expand picks block sizes by it).
    Also what the kernel warm-up compiles."""
    fixed = {k: v for k, v in (("block_t", block_t), ("block_g", block_g)) if v is not None}
    return {**fixed, "rank_bound": rank_bound}


def segments_of(slots: list[int], num_tokens: list[int]) -> tuple[list[int], list[int]]:
    """Runs of equal consecutive slots -> (indptr [G+1], slot per segment [G]).

    slots[i], num_tokens[i]: the slot and token count of the i-th sequence in step order.
    """
    indptr, seg_slots = [0], []
    for slot, n in zip(slots, num_tokens):
        if seg_slots and seg_slots[-1] == slot:
            indptr[-1] += n
        else:
            seg_slots.append(slot)
            indptr.append(indptr[-1] + n)
    return indptr, seg_slots
