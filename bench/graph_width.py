"""Decode-graph segment-table width A/B at the layer (issue 7): what a decode CUDA graph's SGMV launches cost
with the segment table padded to the bucket (the engine before session 17) against padded to the graph's
width (inference_worker/cuda_graphs.table_width: the most segments a step of that tile can have).

A launch's grid holds up to T/tile + G token tiles (kernels/_common.num_tiles_bound), and programs of empty
tiles still look up their segment: a graph on 16-token tiles padded to G = 256 launched 256 tiles where a
step of one adapter fills 16. Per case (T tokens over A adapters, one Llama-3-8B layer's LoRA, 8 launches,
CUDA graphs replayed interleaved, bench.kernels.interleaved_medians), the engine's launch configs (token
tile lora_tile(T, A), its shrink tile, the rank bound = the adapters' rank) under:
  bucket   the tiles of before (1, 2, 16) and G = T;
  width    today's tile (64 from 256 tokens of 33+ a segment) and G = table_width(T, tile);
  width16  (64-token-tile cases) tile 16 at its width: the width's share apart from the new tile;
  pick     the kernels' own tiles with the real G (bench/kernels.py's table).
The engine's graphs add gate/up's LoRA inside the activation on tiles of 16+ (kernels/lora_silu_mul.py); all
variants here run its expand, the same in each.

Usage: python bench/graph_width.py [--ranks 16,64] [--out bench/results/decode-graph-width-h200.json]  (CUDA)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from inference_worker.cuda_graphs import lora_tile, table_width  # noqa: E402
from kernels.tiles import shrink_tile  # noqa: E402

CASES = ((16, 1), (64, 1), (64, 4), (64, 8), (128, 1), (128, 8), (256, 1), (256, 4), (256, 16), (256, 32))
OLD_TILES = (1, 2, 16)       # the decode graphs' tiles before 64-token tiles
REPS = 200


def padded(meta: dict, width: int) -> dict:
    """A segment table padded with empty segments (slot -1) to `width`, as the runner pads a graph step's."""
    g = meta["slots"].shape[0]
    if width < g:
        raise ValueError(f"{g} segments do not fit a table of {width}")
    indptr = torch.cat([meta["indptr"], meta["indptr"][-1:].repeat(width - g)])
    slots = torch.cat([meta["slots"], meta["slots"].new_full((width - g,), -1)])
    return {**meta, "indptr": indptr, "slots": slots}


def engine_configs(tile: int, tokens: int, rank: int) -> tuple[dict, dict]:
    """Per group, the shrink and expand configs a decode graph of this tile and rank bound passes
    (inference_worker/lora/metadata.LoraBatchMeta)."""
    shrink = {g: {"block_t": shrink_tile(tile, tokens, h_in, rank), "rank_bound": rank}
              for g, (h_in, _) in bk.GROUPS.items()}
    return shrink, {g: {"block_t": tile, "rank_bound": rank} for g in bk.GROUPS}


def variants(tokens: int, adapters: int, rank: int, sets: list) -> dict:
    """{name: (metadata sets, shrink configs, expand configs)} of one case."""
    tile = lora_tile(tokens, adapters)
    old = max(t for t in OLD_TILES if t <= tile)
    out = {"bucket": ([padded(m, tokens) for m in sets], *engine_configs(old, tokens, rank)),
           "width": ([padded(m, table_width(tokens, tile)) for m in sets], *engine_configs(tile, tokens, rank))}
    if tile != old:
        out["width16"] = ([padded(m, table_width(tokens, old)) for m in sets], *engine_configs(old, tokens, rank))
    out["pick"] = (sets, None, None)
    return out


def case(pools: bk.Pools, tokens: int, adapters: int) -> dict:
    sets = bk.make_sets(tokens, adapters, bk.K_STEPS)
    layer = bk.Layer(tokens, pools.rank)
    graphs = {name: bk.capture_graph(lambda ms=ms, s=s, e=e: [bk.ours_step(pools, layer, m, s, e) for m in ms])
              for name, (ms, s, e) in variants(tokens, adapters, pools.rank, sets).items()}
    row = bk.interleaved_medians(graphs, REPS)
    tile = lora_tile(tokens, adapters)
    return {"tile": tile, "width": table_width(tokens, tile), **row}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--cases", default=",".join(f"{t}x{a}" for t, a in CASES))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cases = [tuple(int(n) for n in c.split("x")) for c in args.cases.split(",")]
    bk.run_cases(bk.start_report(cases={}), [int(r) for r in args.ranks.split(",")], cases, case, args.out)


if __name__ == "__main__":
    main()
