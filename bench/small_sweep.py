"""The decode steps over issue 7's 2 x line: a block-size sweep of each op, then the layer with each op's
best config against the defaults (H200).

Which steps: those of bench/results/kernels-h200-run14.md above 2 x their floor + launches (16 or 64 tokens of
one or 8 adapters at ranks 8 and 16; every small step at rank 64) and 256 x 64 at rank 8. Why a sweep:
the rules of kernels/sgmv_*.default_config were tuned at rank 16 on mid-size steps; at rank 64 a 1-token
expand walks its rank in 8-row steps, each a dependent round trip to memory, and the dot tiles of a decode
step launch without programmatic dependent launch (PDL), which was measured only on prompt steps.

Per case (tokens x adapters x rank; the pool's rank is the adapters'): each group's shrink and expand alone
over its grid (shrink_grid / expand_grid: token tiles 1, 2, 4 and 16, rows or columns a program, K or rank
steps, H_in splits, PDL), every config checked against the default's result first (bench/tile_sweep.py's
time_configs). Then, interleaved (bench.kernels.interleaved_medians), the layer's 8 launches under the
defaults, under the defaults with PDL on every launch, and under each op's best config.

Triton compiles each config once per pool rank; `--jobs` processes compile them ahead in parallel (the
cache on disk is shared), so the timing process only loads them.

Usage: python bench/small_sweep.py [--cases 1x1x64,64x8x16] [--jobs 12] --out bench/results/small-sweep-h200.json
(CUDA only); python bench/small_sweep.py --markdown a.json b.json --out bench/results/small-sweep-h200.md
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402
from bench.tile_sweep import BLOCK_G, sweep_inputs, time_configs  # noqa: E402
from kernels.tiles import DOT_TILE, next_pow2  # noqa: E402

CASES = ("1x1x64", "16x1x64", "64x1x64", "64x8x64", "256x1x64", "16x1x16", "64x1x16", "64x8x16", "16x1x8",
         "64x8x8", "256x64x8")
REPS = 200
WIDE = 128               # tokens a segment from which the grids also try token tiles past 16 (up to 256)
WARM_SLOTS = 64          # the compile-ahead processes' pools (>= any case's adapters): a config compiles the same for any slot count


def parse_case(text: str) -> tuple[int, int, int]:
    tokens, adapters, rank = (int(n) for n in text.split("x"))
    return tokens, adapters, rank


def decode_tiles(tokens: int, adapters: int) -> list[int]:
    """Decode tiles worth trying: none longer than a segment's tokens (the rest of the tile is empty)."""
    per_seg = tokens // adapters
    return [bt for bt in (1, 2, 4) if bt <= max(1, per_seg)]


def shrink_grid(tokens: int, adapters: int, rank: int) -> list[dict]:
    """Decode tiles: rows a program, A elements a K step, H_in splits; 16-token dot tiles (4+ tokens a
    segment): columns, splits and PDL."""
    cfgs = [{"block_t": bt, "block_n": bn, "block_k": n_el // (bn * bt), "split_k": sk, "num_warps": 4}
            for bt in decode_tiles(tokens, adapters) for bn in (2, 4, 8) for n_el in (4096, 8192) for sk in (1, 2, 4)]
    if tokens // adapters >= 4:
        cfgs += [{"block_t": DOT_TILE, "block_n": bn, "block_k": 128, "split_k": sk, "num_warps": 4, "num_stages": ns,
                  "pdl": pdl} for bn in (16, 32, 64) for sk in (4, 8, 16) for ns in (4,) for pdl in (False, True)]
    if tokens // adapters >= WIDE:
        # long segments: wider tiles read A fewer times (each token tile re-reads its columns' A)
        cfgs += [{"block_t": bt, "block_n": bn, "block_k": 128, "split_k": sk, "num_warps": w, "num_stages": ns}
                 for bt in (32, 64, 128) for bn in (32, 64, 128) for sk in (4, 8, 16) for w in (4,) for ns in (3, 4)]
    return cfgs


def expand_grid(tokens: int, adapters: int, rank: int) -> list[dict]:
    """Decode tiles: columns a program and rank rows a step (up to all of them: no rank loop), and the
    1-token path that reads B before the PDL wait; 16-token dot tiles: columns, rows a step (64: loop-free
    at rank 64) and PDL."""
    rank_p2 = next_pow2(rank)
    rows = [br for br in (8, 16, 32, 64) if br <= max(8, rank_p2)]
    cfgs = [{"block_t": bt, "block_n": bn, "block_r": br, "num_warps": 8 if bn <= 256 else 4, "early": False}
            for bt in decode_tiles(tokens, adapters) for bn in (128, 256, 512) for br in rows]
    if tokens == adapters:                                 # 1 token a segment: the early-B path
        cfgs += [{"block_t": 1, "block_n": bn, "block_r": br, "num_warps": 2, "early": True}
                 for bn in (256, 512) for br in (8, 16) if br <= max(8, rank_p2)]
        if rank > 16:                                      # past rank 16: more (or all) rows read early
            cfgs += [{"block_t": 1, "block_n": bn, "block_r": br, "num_warps": w, "early": True}
                     for bn in (64, 128, 256) for br in (32, 64) for w in (2, 4) if br <= rank_p2]
    if tokens // adapters >= 4:
        cfgs += [{"block_t": DOT_TILE, "block_n": bn, "block_r": br, "num_warps": 4, "num_stages": 2,
                  "prefetch": rank <= br, "pdl": pdl, "early_dot": early}
                 for bn in (128, 256) for br in ((16, 64) if rank > 16 else (16,)) for pdl in (False, True)
                 for early in ((False, True) if pdl and rank <= br else (False,))]
    if tokens // adapters >= WIDE:
        # long segments: wider tiles read B fewer times (each token tile re-reads its columns' B)
        cfgs += [{"block_t": bt, "block_n": bn, "block_r": br, "num_warps": w, "num_stages": 2,
                  "prefetch": rank <= br, "early_dot": early}
                 for bt in (16, 32, 64, 128, 256) for bn in (32, 64, 128, 256) if bt * bn <= 16384
                 for br in ((16, 64) if rank > 16 else (16,)) for w in (4, 8)
                 for early in ((False, True) if rank <= br else (False,))]
    return cfgs


def grids(tokens: int, adapters: int, rank: int) -> tuple[list, list]:
    return shrink_grid(tokens, adapters, rank), expand_grid(tokens, adapters, rank)


def _warm(job: int, jobs: int, cases: list[str], grid_fn=grids) -> None:
    """Compile-ahead worker: launches every `jobs`-th (case, group, op, config) once, errors ignored (the
    timing pass reports them)."""
    torch.cuda.set_device(0)
    pools = {}
    n = 0
    for c in cases:
        tokens, adapters, rank = parse_case(c)
        if rank not in pools:
            pools[rank] = bk.Pools(rank, WARM_SLOTS)
        layer = bk.Layer(tokens, rank)
        meta = bk.make_sets(tokens, adapters, 1, WARM_SLOTS)[0]
        for g, (_, widths) in bk.GROUPS.items():
            for op, cfgs in zip(("shrink", "expand"), grid_fn(tokens, adapters, rank)):
                for cfg in cfgs:
                    n += 1
                    if n % jobs != job:
                        continue
                    try:
                        bk._one_op(op, g, widths, layer, pools[rank], {"block_g": BLOCK_G, **cfg})(meta)
                    except Exception:  # noqa: BLE001, S110 - reported by the timing pass
                        pass
    torch.cuda.synchronize()


def compile_ahead(cases: list[str], jobs: int, grid_fn=grids) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_warm, args=(j, jobs, cases, grid_fn)) for j in range(jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def best_per_op(row: dict) -> tuple[dict, dict]:
    """(shrink configs, expand configs) per group: each op's fastest config, None where the default won."""
    shrink, expand = {}, {}
    for key, res in row.items():
        g, op = key.split(".")
        us, cfg = min(res["all"], key=lambda r: r[0])
        if cfg is not None:
            (shrink if op == "shrink" else expand)[g] = cfg
    return shrink, expand


def case(pools: bk.Pools, tokens: int, adapters: int, log: list, grid_fn=grids) -> dict:
    sets, layer, refs = sweep_inputs(pools, tokens, adapters)
    ops = {}
    for g in bk.GROUPS:
        for op, cfgs in zip(("shrink", "expand"), grid_fn(tokens, adapters, pools.rank)):
            results = time_configs(op, g, layer, refs, pools, sets, cfgs, log)
            us, cfg = min(results, key=lambda r: r[0])
            ops[f"{g}.{op}"] = {"default_us": results[0][0], "best_us": us, "best_cfg": cfg, "all": results}
            print(f"{tokens}x{adapters}x{pools.rank} {g:8s} {op:6s} default {results[0][0]:6.2f} best {us:6.2f} {cfg}",
                  flush=True)
    shrink, expand = best_per_op(ops)
    # (the layer's variants at the default segment-table width, the table's: time_configs adds its fixed
    # one to the launch, not to the configs it returns)
    variants = {"default": ({}, {}),
                "pdl": ({g: {"pdl": True} for g in bk.GROUPS}, {g: {"pdl": True} for g in bk.GROUPS}),
                "best": (shrink, expand)}
    graphs = {name: bk.capture_graph(lambda s=s, e=e: [bk.ours_step(pools, layer, m, s, e) for m in sets])
              for name, (s, e) in variants.items()}
    layer_us = bk.interleaved_medians(graphs, REPS)
    print(f"{tokens}x{adapters}x{pools.rank} layer " + " ".join(f"{k} {v:.2f}" for k, v in layer_us.items()), flush=True)
    return {"ops": ops, "layer_us": layer_us, "best": {"shrink": variants["best"][0], "expand": variants["best"][1]}}


SHORT = {"block_t": "t", "block_n": "n", "block_k": "k", "split_k": "split", "block_r": "r", "num_warps": "warps",
         "num_stages": "stages"}


def _cfg_text(cfg: dict | None) -> str:
    if cfg is None:
        return "default"
    flags = [k for k in ("early", "early_dot", "prefetch", "pdl") if cfg.get(k)]
    return " ".join([f"{SHORT[k]} {v}" for k, v in cfg.items() if k in SHORT] + flags)


def write_markdown(reports: list[dict], path: str) -> None:
    """Per case: the layer under each variant, then each op's default and best (µs per launch)."""
    lines = ["# Small decode steps: block-size sweep and the layer with each op's best", ""]
    for rep in reports:
        lines += [f"{rep['device']}, {rep['date']}. Command: `{rep['command']}`. Each op alone: CUDA graph of 4 "
                  f"launches over disjoint adapter sets, segment table {rep['block_g']} wide; every config checked "
                  "against the default's result. Layer: its 8 launches, interleaved medians of 200 replays.", "",
                  "| case | layer: default | PDL on every launch | each op's best |", "|---|---:|---:|---:|"]
        lines += [f"| {c} | {r['layer_us']['default']:.2f} | {r['layer_us']['pdl']:.2f} | {r['layer_us']['best']:.2f} |"
                  for c, r in rep["cases"].items()]
        lines += ["", "| case | op | default | best | best config |", "|---|---|---:|---:|---|"]
        lines += [f"| {c} | {op} | {res['default_us']:.2f} | {res['best_us']:.2f} | {_cfg_text(res['best_cfg'])} |"
                  for c, r in rep["cases"].items() for op, res in r["ops"].items()]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(grid_fn=grids, default_cases=CASES) -> None:
    """The sweep over grid_fn's (shrink configs, expand configs) of each case (another script may bring its own)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(default_cases))
    ap.add_argument("--jobs", type=int, default=12, help="compile-ahead processes (0: none)")
    ap.add_argument("--out", default="")
    ap.add_argument("--markdown", nargs="+", metavar="JSON", help="only write --out (.md) from these results")
    args = ap.parse_args()
    if args.markdown:
        reports = []
        for path in args.markdown:
            with open(path) as f:
                reports.append(json.load(f))
        write_markdown(reports, args.out)
        return
    cases = args.cases.split(",")
    log: list = []
    report = bk.start_report(block_g=BLOCK_G, cases={}, log=log)
    if args.jobs:
        compile_ahead(cases, args.jobs, grid_fn)
    pools = {}
    for c in cases:
        tokens, adapters, rank = parse_case(c)
        if rank not in pools:
            pools[rank] = bk.Pools(rank)
        report["cases"][c] = case(pools[rank], tokens, adapters, log, grid_fn)
        if args.out:                             # after each case: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
            write_markdown([report], os.path.splitext(args.out)[0] + ".md")
    for line in log:
        print("log:", line)


if __name__ == "__main__":
    main()
