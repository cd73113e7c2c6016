"""Helpers shared by the Triton LoRA kernels: launch checks and the segment-tile map.

Segment tiles (why): a program must know its adapter slot without the host reading
`seg_indptr` (a device->host sync, and not capturable in a CUDA graph). So the grid
is sized from host ints only: at most `T // BLOCK_T + G + 1` tiles, and each program
rebuilds the tile map from `seg_indptr` itself (G+1 ints, a cumsum) and finds which
segment and which BLOCK_T-token tile of it is its own. Tokens past seg_indptr[G] (if
any) form a virtual base segment G, so they are still zeroed by shrink.
"""
from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl

from kernels.tiles import MANY_TOKENS, cdiv, segment_table_width


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


try:  # Hopper grid dependency control (triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch for the SGMV kernels, on by default on Hopper or newer
    (OPENLORA_SGMV_PDL=0 turns it off). A kernel launched so may start while the one before it in
    the stream finishes: its programs find their segment (metadata written long before) and only
    then wait (`gdc_wait`) for the previous kernel's writes (x, y, out). H200, 64 tokens x 64
    rank-16 adapters, one layer in a CUDA graph: 90.3 -> 78.6 µs (bench/results/kernels-h200-quick.md)."""
    return device.type == "cuda" and _pdl_on(os.environ.get("OPENLORA_SGMV_PDL", "1") != "0", device.index)


@functools.lru_cache(maxsize=None)
def _pdl_on(wanted: bool, index: int | None) -> bool:
    # cached: every SGMV launch asks, and the capability query costs microseconds of host time
    return wanted and gdc_wait is not None and not interpreting() and torch.cuda.get_device_capability(index)[0] >= 9


def early_weights() -> bool:
    """Decode-tile SGMV programs read their first block of adapter weights before the PDL wait, on by
    default (OPENLORA_SGMV_EARLY=0 turns it off). No kernel of a step writes the A/B pools (adapter
    loads run on the copy stream, which the compute stream waits for by event), so those reads may
    overlap the previous kernel's tail like the segment lookup does; what the previous kernel wrote
    (x, y, out) is still read after the wait. Harmless without PDL (the wait is then a no-op)."""
    return os.environ.get("OPENLORA_SGMV_EARLY", "1") != "0"


def pdl_default(use_dot: bool, num_tokens: int) -> bool:
    """Whether an SGMV launch asks for PDL by default: decode tiles always; tl.dot tiles in decode-sized
    steps (up to MANY_TOKENS), not in prompt steps (launch_options says why). H200, one layer's 8
    launches (bench/results/decode-ab-h200.json): 64 tokens x 8 rank-16 adapters 41.4 -> 36.1 µs,
    256 x 64 at rank 8 97.8 -> 93.0."""
    return not use_dot or num_tokens <= MANY_TOKENS


def launch_options(device: torch.device, pdl: bool = True) -> dict:
    """Extra launch kwargs: launch_pdl when the launch asks for it and PDL is on (older triton has no
    such option). Launchers ask for it in decode-sized steps only (their config's "pdl" default:
    pdl_default). Prompt steps' tl.dot tiles follow a long base matmul, and their programs launched early
    sit on SM resources the matmul is still using: H200, a 2048-token Llama-3-8B layer with its LoRA,
    1354 µs with PDL against 1338 without (and 1351 against 1290 with the gate/up LoRA in the
    activation); back to back, PDL gave those launches nothing (190 µs either way):
    bench/notes/kernels.md, session 9."""
    return {"launch_pdl": True} if pdl and pdl_enabled(device) else {}


def check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    if dev.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (got {dev}); on CPU set TRITON_INTERPRET=1")
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device: {t.device} != {dev}")


def check_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def check_lora_meta(seg_indptr: torch.Tensor, seg_slots: torch.Tensor, slot_ranks: torch.Tensor,
                    num_slots: int, slot_scales: torch.Tensor | None = None) -> int:
    """Validates the per-step metadata shapes/dtypes; returns G (number of segments)."""
    if seg_slots.dim() != 1 or seg_slots.dtype != torch.int32:
        raise ValueError(f"seg_slots must be [G] int32, got {tuple(seg_slots.shape)} {seg_slots.dtype}")
    num_segs = seg_slots.shape[0]
    if seg_indptr.shape != (num_segs + 1,) or seg_indptr.dtype != torch.int32:
        raise ValueError(f"seg_indptr must be [G+1={num_segs + 1}] int32, got "
                         f"{tuple(seg_indptr.shape)} {seg_indptr.dtype}")
    if slot_ranks.shape != (num_slots,) or slot_ranks.dtype != torch.int32:
        raise ValueError(f"slot_ranks must be [S={num_slots}] int32, got "
                         f"{tuple(slot_ranks.shape)} {slot_ranks.dtype}")
    if slot_scales is not None and (slot_scales.shape != (num_slots,) or slot_scales.dtype != torch.float32):
        raise ValueError(f"slot_scales must be [S={num_slots}] float32, got "
                         f"{tuple(slot_scales.shape)} {slot_scales.dtype}")
    check_contiguous(seg_indptr=seg_indptr, seg_slots=seg_slots, slot_ranks=slot_ranks)
    return num_segs


MAX_MODULES = 4          # fused modules of one projection (q/k/v: 3, gate/up: 2); module_of's branches


def check_out_offsets(out_offsets: tuple[int, ...], num_mods: int, n: int) -> tuple[int, ...]:
    """The M+1 column bounds of fused modules, as ints: rising strictly from 0 to N, M <= MAX_MODULES."""
    offsets = tuple(int(o) for o in out_offsets)
    if len(offsets) != num_mods + 1 or offsets[0] != 0 or offsets[-1] != n or \
            any(b <= a for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"out_offsets {offsets} must rise strictly from 0 to N={n} in M+1={num_mods + 1} steps")
    if num_mods > MAX_MODULES:
        raise ValueError(f"at most {MAX_MODULES} fused modules, got {num_mods}")
    return offsets


def module_table(offsets: tuple[int, ...], block: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Host side of module_of: modules cut into blocks of `block` columns -> (the MAX_MODULES
    column ends, the MAX_MODULES-1 cumulative block counts, the total blocks), padded so that
    unused modules are never reached."""
    n = offsets[-1]
    cum = list(itertools.accumulate(cdiv(b - a, block) for a, b in itertools.pairwise(offsets)))
    never = 1 << 30
    ends = (offsets[1:] + (n,) * MAX_MODULES)[:MAX_MODULES]
    cum_blocks = (cum[:-1] + [never] * MAX_MODULES)[:MAX_MODULES - 1]
    return ends, tuple(cum_blocks), cum[-1]


def block_g_for(num_segs: int, block_g: int | None = None) -> int:
    """BLOCK_G: the segment-table width a program loads (a power of 2 >= G + 2). A caller may fix it
    wider (config "block_g"), so that steps of any segment count share one compiled variant."""
    need = segment_table_width(num_segs)
    if block_g is None:
        return need
    if block_g < need or block_g & (block_g - 1):
        raise ValueError(f"block_g {block_g} must be a power of 2 >= G + 2 = {num_segs + 2}")
    return block_g


def num_tiles_bound(num_tokens: int, num_segs: int, block_t: int) -> int:
    """Upper bound of the tiles sum_g ceil(len_g / BLOCK_T) over the G segments plus the tail.

    Each of the G+1 terms is at most (len_g + BLOCK_T - 1) / BLOCK_T, so the sum is at most
    (T + (G+1)(BLOCK_T-1)) / BLOCK_T: exactly T for 1-token tiles (a decode graph pads its
    segment table to G = T; the looser T + G + 1 launched twice the programs, half of them
    empty), and never more than the old T // BLOCK_T + G + 1.
    """
    tight = (num_tokens + (num_segs + 1) * (block_t - 1)) // block_t
    return min(tight, num_tokens // block_t + num_segs + 1)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """At a kernel's start: let the next kernel in the stream launch early."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Before the first read of what the previous kernel wrote, and before any write (every
    program passes here, also one that exits early, so a kernel never completes before its
    predecessor)."""
    if PDL:
        gdc_wait()


@triton.jit
def module_of(idx, cb1, cb2, cb3, off1, off2, off3, off4):
    """Fused modules (q/k/v, gate/up; up to 4) own consecutive ranges of column blocks: block
    `idx` -> (module m, its columns [mod_lo, mod_hi), the module's first block). cb1..cb3 are the
    cumulative block counts of modules 0..2, off1..off4 the modules' column ends."""
    m = (idx >= cb1).to(tl.int32) + (idx >= cb2).to(tl.int32) + (idx >= cb3).to(tl.int32)
    mod_lo = tl.where(m == 0, 0, tl.where(m == 1, off1, tl.where(m == 2, off2, off3)))
    mod_hi = tl.where(m == 0, off1, tl.where(m == 1, off2, tl.where(m == 2, off3, off4)))
    first = tl.where(m == 0, 0, tl.where(m == 1, cb1, tl.where(m == 2, cb2, cb3)))
    return m, mod_lo, mod_hi, first


@triton.jit
def segment_tile(pid_tile, indptr_ptr, slots_ptr, ranks_ptr, T, G, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """-> (tile_start, tile_end, slot, rank): the tokens [tile_start, tile_end) of this program.

    tile_end <= tile_start when pid_tile is past the last tile; slot = -1 and rank = 0 for
    base tokens. indptr and slots are loaded together and the ranks gathered for all
    segments at once: two dependent memory round trips before the program's real loads.
    """
    offs_g = tl.arange(0, BLOCK_G)
    starts = tl.load(indptr_ptr + offs_g, mask=offs_g <= G, other=T)
    ends = tl.load(indptr_ptr + offs_g + 1, mask=offs_g < G, other=T)
    slots = tl.load(slots_ptr + offs_g, mask=offs_g < G, other=-1)
    ranks = tl.load(ranks_ptr + tl.maximum(slots, 0), mask=slots >= 0, other=0)
    lens = tl.maximum(ends - starts, 0)
    ntiles = (lens + BLOCK_T - 1) // BLOCK_T
    cum = tl.cumsum(ntiles, 0)                          # inclusive prefix sum of tiles
    g = tl.sum((cum <= pid_tile).to(tl.int32), 0)       # first segment whose tiles reach pid
    sel = offs_g == g
    tile_start = tl.sum(tl.where(sel, starts + (pid_tile - (cum - ntiles)) * BLOCK_T, 0), 0)
    seg_end = tl.sum(tl.where(sel, ends, 0), 0)
    slot = tl.sum(tl.where(sel, slots, 0), 0)
    rank = tl.sum(tl.where(sel, ranks, 0), 0)
    tile_end = tl.minimum(tile_start + BLOCK_T, seg_end)
    tile_end = tl.where(g <= G, tile_end, tile_start)   # past the last tile: empty
    slot = tl.where(g < G, slot, -1)
    return tile_start, tile_end, slot, rank
