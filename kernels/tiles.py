"""Token-tile choice of the SGMV kernels, in plain Python (no triton import): the engine's
CUDA-graph code picks a tile per step, and importing triton's JIT there would decorate the
kernels before a test can ask for the interpreter (TRITON_INTERPRET)."""
from __future__ import annotations


def pick_block_t(num_tokens: int, num_segs: int) -> int:
    """Token tile from the average segment length (host ints only; any real mix stays correct)."""
    avg = num_tokens / max(num_segs, 1)
    if avg < 1.5:
        return 1
    if avg < 12:
        return 2          # H200 sweep: 2-token tiles beat 4 and 8 for 4..8-token segments
    return min(64, max(16, 1 << (int(avg) - 1).bit_length()))
