"""Token-tile sweep of the decode SGMV on a Hopper GPU (issue 7): for decode steps whose segments hold
several tokens (64 tokens over 1 or 8 adapters, 256 over 1, 16 or 64, ...), each group's shrink and
expand alone over token tiles 1..64 and a few block sizes per tile, rank-16 adapters (or --rank). The tile
rules of kernels/tiles.py come from its H200 run (bench/results/tile-sweep-h200.md; the rule before it,
2-token tiles for 1.5..12 tokens a segment, dated from early code). Every config's output is checked
against the default's first (a config that disagrees is reported and left out).

All launches use one segment-table width (block_g 128, as the engine's decode graphs of bucket 64 do)
so that one compiled variant serves every case. Prints per case and op the best time per tile; JSON
holds every config's time.

Usage: python bench/tile_sweep.py [--cases 64x8,256x64] [--rank 64] [--dot] --out bench/results/tile-sweep-h200.json (CUDA only)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.kernels as bk  # noqa: E402

CASES = ((64, 8), (256, 64), (256, 16), (64, 1), (256, 1), (16, 1), (64, 16))
BLOCK_G = 128
# decode tiles: multiply-reduce over 4096 (or, for 4- and 8-token tiles, 8192) products a K step
SHRINK = ([{"block_t": bt, "block_n": bn, "block_k": n_el // (bn * bt), "split_k": sk, "num_warps": 4}
           for bt in (1, 2, 4, 8) for n_el in (4096, 8192) for bn in (2, 4, 8) for sk in (1, 2) if n_el == 4096 or bt >= 4]
          + [{"block_t": bt, "block_n": bn, "block_k": 128, "split_k": sk, "num_warps": 4}
             for bt in (16, 64) for bn in (32, 64) for sk in (1, 4, 16)])
EXPAND = ([{"block_t": bt, "block_n": bn, "block_r": br, "num_warps": 4}
           for bt in (2, 4, 8) for bn in (256, 512, 1024) for br in (8, 16)]
          + [{"block_t": bt, "block_n": 256, "block_r": 16, "num_warps": 8} for bt in (2, 4, 8)]
          + [{"block_t": bt, "block_n": bn, "block_r": 16, "num_warps": nw, "num_stages": 2}
             for bt in (16, 64) for bn in (128, 256) for nw in (4, 8)])

# --dot: the tl.dot path alone (16-token tiles), over what the sweep above holds fixed: K steps, H_in
# splits and pipeline stages of the shrink; blocks a program, column widths, warps and the next block's
# loads in flight (config "prefetch") of the expand
SHRINK_DOT = [{"block_t": 16, "block_n": bn, "block_k": bk, "split_k": sk, "num_warps": 4, "num_stages": ns}
              for bn in (32, 64) for bk in (64, 128, 256) for sk in (4, 8, 16) for ns in (2, 4)]
EXPAND_DOT = ([{"block_t": 16, "block_n": bn, "block_r": 16, "nb_per_prog": nbp, "num_warps": 4, "num_stages": 2,
                "prefetch": pre} for bn in (64, 128, 256) for nbp in (1, 2, 4, 8) for pre in (False, True)]
              + [{"block_t": 16, "block_n": bn, "block_r": 16, "nb_per_prog": nbp, "num_warps": 2, "num_stages": 1,
                  "prefetch": True} for bn in (64, 128) for nbp in (2, 4, 8)])


def time_configs(op: str, g: str, layer: bk.Layer, refs: dict, pools: bk.Pools, sets: list, cfgs: list,
                 log: list) -> list:
    """[(µs per step, cfg)] for the default (cfg None) and each config; a config whose result differs
    from the default's by more than bf16 rounding is logged and timed as inf."""
    widths = bk.GROUPS[g][1]
    first, results = None, []
    for cfg in [None] + cfgs:
        try:
            fn = bk._one_op(op, g, widths, layer, pools, {"block_g": BLOCK_G, **(cfg or {})})
            res = one_result(op, g, layer, refs, fn, sets[0])
            if first is None:
                first = res
            else:
                err = ((res - first).abs().max() / first.abs().max().clamp_min(1e-6)).item()
                if err > 3e-2:
                    raise AssertionError(f"rel err {err:.3e} against the default")
            us = bk.median_graph_us(lambda fn=fn: [fn(m) for m in sets], steps=bk.K_STEPS, reps=20)
        except Exception as exc:  # noqa: BLE001 - a bad config is a data point
            us = float("inf")
            log.append(f"{op} {g} {cfg}: {exc!r}"[:300])
        results.append((round(us, 2), cfg))
    return results


def one_result(op: str, g: str, layer: bk.Layer, refs: dict, fn, meta: dict) -> torch.Tensor:
    """What one launch computes: the shrink's y, or the expand's addition to out (refs: the expands'
    inputs, y and out)."""
    if op == "shrink":
        fn(meta)
        return layer.y[g].float().clone()
    layer.y[g].copy_(refs["y"][g])
    layer.out[g].copy_(refs["out"][g])            # timing replays keep adding to out: start afresh
    fn(meta)
    return layer.out[g].float() - refs["out"][g].float()


def sweep_inputs(pools: bk.Pools, tokens: int, adapters: int) -> tuple[list, bk.Layer, dict]:
    """A case's adapter sets (bench.kernels.make_sets), activations, and the expands' reference inputs (refs
    of time_configs)."""
    sets = bk.make_sets(tokens, adapters, bk.K_STEPS)
    layer = bk.Layer(tokens, pools.rank)
    refs = {"y": {g: torch.randn_like(y) for g, y in layer.y.items()},
            "out": {g: out.clone() for g, out in layer.out.items()}}
    return sets, layer, refs


def case(pools: bk.Pools, tokens: int, adapters: int, log: list, grids: tuple = (SHRINK, EXPAND)) -> dict:
    sets, layer, refs = sweep_inputs(pools, tokens, adapters)
    row = {}
    for g in bk.GROUPS:
        for op, cfgs in zip(("shrink", "expand"), grids):
            results = time_configs(op, g, layer, refs, pools, sets, cfgs, log)
            per_tile = {}
            for us, cfg in results[1:]:
                bt = cfg["block_t"]
                if us < per_tile.get(bt, (float("inf"),))[0]:
                    per_tile[bt] = (us, cfg)
            row[f"{g}.{op}"] = {"default_us": results[0][0], "per_tile": {str(k): v for k, v in per_tile.items()},
                                "all": results}
            tiles = "  ".join(f"t{bt} {us:6.2f}" for bt, (us, _) in sorted(per_tile.items()))
            print(f"{tokens}x{adapters} {g:8s} {op:6s} default {results[0][0]:6.2f} | {tiles}", flush=True)
    return row


def write_markdown(report: dict, path: str) -> None:
    """Per case and op: the default's µs and the best config's µs of each token tile (--dot: the best
    three configs)."""
    if report.get("dot"):
        write_dot_markdown(report, path)
        return
    tiles = sorted({int(t) for row in report["cases"].values() for op in row.values() for t in op["per_tile"]})
    lines = [f"# SGMV token-tile sweep: {report['device']}", "",
             f"{report['date']}, rank {report.get('rank', 16)}, block_g {report['block_g']}. Command: "
             f"`{report['command']}`. µs per launch, each op alone (CUDA graph of 4 launches over disjoint "
             "adapter sets); per tile the best of its swept configs; `default` is the rule of the code that ran.",
             "", "| case | op | default | " + " | ".join(f"tile {t}" for t in tiles) + " |",
             "|---|---|---:|" + "---:|" * len(tiles)]
    for case_name, row in report["cases"].items():
        for op, res in row.items():
            cells = [res["per_tile"].get(str(t), [None])[0] for t in tiles]
            best = min(c for c in cells if c is not None)
            lines.append(f"| {case_name} | {op} | {res['default_us']:.2f} | " + " | ".join(
                "-" if c is None else (f"**{c:.2f}**" if c == best else f"{c:.2f}") for c in cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_dot_markdown(report: dict, path: str) -> None:
    short = {"block_n": "n", "block_k": "k", "split_k": "split", "nb_per_prog": "blocks/prog", "num_warps": "warps",
             "num_stages": "stages", "prefetch": "prefetch"}
    lines = [f"# SGMV dot-tile sweep: {report['device']}", "",
             f"{report['date']}, rank {report.get('rank', 16)}, block_g {report['block_g']}, 16-token tiles. Command: "
             f"`{report['command']}`. µs per launch, each op alone (CUDA graph of 4 launches over disjoint adapter "
             "sets); `default` is the rule of the code that ran; the JSON holds every config.", "",
             "| case | op | default | best | 2nd | 3rd |", "|---|---|---:|---|---|---|"]
    for case_name, row in report["cases"].items():
        for op, res in row.items():
            top = sorted((r for r in res["all"] if r[1]), key=lambda r: r[0])[:3]
            cells = [f"{us:.2f} " + " ".join(f"{short[k]} {int(v)}" for k, v in cfg.items() if k in short)
                     for us, cfg in top]
            lines.append(f"| {case_name} | {op} | {res['default_us']:.2f} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(f"{t}x{a}" for t, a in CASES))
    ap.add_argument("--rank", type=int, default=16, help="every adapter's rank (and the pool's)")
    ap.add_argument("--dot", action="store_true", help="sweep the tl.dot path's block sizes (16-token tiles) instead")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    log: list = []
    report = bk.start_report(block_g=BLOCK_G, rank=args.rank, dot=args.dot, cases={}, log=log)
    pools = bk.Pools(args.rank)
    for c in args.cases.split(","):
        tokens, adapters = (int(n) for n in c.split("x"))
        report["cases"][c] = case(pools, tokens, adapters, log, (SHRINK_DOT, EXPAND_DOT) if args.dot else (SHRINK, EXPAND))
        if args.out:                             # after each case: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
            write_markdown(report, os.path.splitext(args.out)[0] + ".md")
    for line in log:
        print("log:", line)


if __name__ == "__main__":
    main()
