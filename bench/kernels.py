"""Benchmark of the Triton kernels on CUDA: SGMV over a Llama-3-8B layer, paged decode attention.

Per LoRA case (tokens T over A distinct adapters at rank r, all 7 projections of one layer:
fused qkv shrink+expand, o, fused gate_up, down):
  ours      the layer's 8 SGMV launches (+ y zeroing) timed as CUDA-graph replays, median;
            each replay runs K=4 layer steps over disjoint adapter sets (so the adapters
            are read from HBM, not L2), time is per step;
  (a) loop  a per-adapter loop of torch matmuls (eager, as an engine without SGMV would);
  (b) bmm   gathered bmm (BGMV-style: A/B indexed by each token's slot, then torch.bmm), graph;
  floor     distinct A/B bytes + activations (x read, y written and read, out read and
            written) over the device-to-device copy bandwidth measured in this run;
  achieved  those bytes over ours (TB/s), to set beside the copy bandwidth;
  base      the layer's base matmuls (x @ Wᵀ for qkv, o, gate_up, down), graph.
Paged attention: our decode kernel vs gathering the KV through the block table + SDPA.

Usage: python bench/kernels.py [--out bench/results/kernels-h200.json] [--quick] [--sweep]
       python bench/kernels.py --markdown bench/results/kernels-h200.json --out bench/results/kernels-h200.json
           (only rewrites the table's .md from its JSON; CPU)
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inference_worker.lora.layers import run_beside
from inference_worker.prompt_graphs import PROMPT_SHRINK_TILE, PROMPT_TILE
from kernels.activation import silu_and_mul
from kernels.lora_decode import lora_decode
from kernels.lora_silu_mul import lora_silu_mul
from kernels.paged_attention import paged_attention_decode
from kernels.sgmv_expand import sgmv_expand
from kernels.sgmv_shrink import sgmv_shrink
from kernels.tiles import fused_decode_enabled, fused_decode_fits, pick_block_t

HIDDEN, INTER = 4096, 14336
# group -> (H_in, output widths of the fused modules)
GROUPS = {"qkv": (HIDDEN, [4096, 1024, 1024]), "o": (HIDDEN, [4096]),
          "gate_up": (HIDDEN, [INTER, INTER]), "down": (INTER, [HIDDEN])}
K_STEPS = 4          # layer steps per graph replay, each over its own adapter set
POOL_SLOTS = 1024    # adapters per rank in the pool (4 disjoint sets of up to 256)
DEV = "cuda"
ISSUE_BW = 4.25e12   # the copy bandwidth the issue measured on this H200 (its floors use it)
COPY_VARIANTS: dict = {}
PROMPT_REPS = 100    # interleaved replays of the prompt layer with and without its LoRA (layer_interleaved)


def start_report(**fields) -> dict:
    """A CUDA benchmark script's start: exits without a GPU, seeds torch, and returns its report's header
    (device, date, command) with `fields`."""
    script = os.path.relpath(sys.argv[0])
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs CUDA (one Hopper-class GPU)")
    torch.manual_seed(0)
    return {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python3 " + " ".join([script, *sys.argv[1:]]), **fields}


def capture_graph(step) -> torch.cuda.CUDAGraph:
    """step() captured in a CUDA graph (after a warm-up call on the capture stream), replayed 3 times."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                   # warm-up on the side stream (allocator)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
    return graph


def replay_us(graphs: list, reps: int) -> list[list[float]]:
    """µs of each replay: `reps` rounds, each replaying every graph once back to back (no sync between);
    -> [rep][graph]."""
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in graphs]
              for _ in range(reps)]
    for rnd in events:
        for graph, (e0, e1) in zip(graphs, rnd):
            e0.record()
            graph.replay()
            e1.record()
    torch.cuda.synchronize()
    return [[e0.elapsed_time(e1) * 1e3 for e0, e1 in rnd] for rnd in events]


def interleaved_medians(graphs: dict, reps: int, steps: int = K_STEPS) -> dict:
    """{name: median µs per step}: `reps` rounds, each replaying every graph once (replay_us), so drift
    hits all of them alike; each graph runs `steps` layer steps."""
    names = list(graphs)
    times = replay_us([graphs[n] for n in names], reps)
    return {n: round(statistics.median(t[i] for t in times) / steps, 2) for i, n in enumerate(names)}


def run_cases(report: dict, ranks, cases, measure, out: str = "") -> dict:
    """Per rank (one Pools each) and case (tokens, adapters): report["cases"]["TxAxR"] = measure(pools, tokens,
    adapters), a dict printed on one line and (with `out`) the report written after each case."""
    for rank in ranks:
        pools = Pools(rank)
        for tokens, adapters in cases:
            key = f"{tokens}x{adapters}x{rank}"
            report["cases"][key] = row = measure(pools, tokens, adapters)
            print(key, " ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
            if out:
                with open(out, "w") as f:
                    json.dump(report, f, indent=1)
        del pools
    return report


def median_graph_us(step, reps=40, steps=1):
    """Captures step() in a CUDA graph, replays it `reps` times; median µs per replay / steps."""
    graph = capture_graph(step)
    times = [t[0] for t in replay_us([graph], reps)]
    del graph
    return statistics.median(times) / steps


def median_eager_us(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device clone, counting bytes read + written."""
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    for _ in range(200):                                               # clocks up first (~0.3 s)
        a @ a
    src = torch.randn(1 << 30, device=DEV, dtype=torch.float32)     # 4 GiB
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * 4
    variants = {"copy_graph": min(median_graph_us(lambda: dst.copy_(src), reps=20) for _ in range(2)),
                "copy_eager": median_eager_us(lambda: dst.copy_(src), reps=10),
                "clone_bf16_eager": median_eager_us(lambda: src.view(torch.bfloat16).clone(), reps=10)}
    COPY_VARIANTS.update({k: nbytes / (us * 1e-6) / 1e12 for k, us in variants.items()})
    bw = max(COPY_VARIANTS.values()) * 1e12
    del a
    torch.cuda.empty_cache()
    return bw


def empty_node_us() -> float:
    """Cost of one tiny kernel node inside a graph (launch floor of a dependent kernel)."""
    t = torch.zeros(1, device=DEV)
    return median_graph_us(lambda: [t.add_(1) for _ in range(100)], reps=20) / 100


class Pools:
    """LoRA slot pools of one rank for all four groups: A [S, M, R, H_in], B [S, R, N] (bf16)."""

    def __init__(self, rank: int, num_slots: int = POOL_SLOTS):
        self.rank = rank
        self.a, self.b = {}, {}
        for name, (h_in, widths) in GROUPS.items():
            self.a[name] = torch.randn(num_slots, len(widths), rank, h_in, device=DEV,
                                       dtype=torch.bfloat16).mul_(h_in ** -0.5)
            self.b[name] = torch.randn(num_slots, rank, sum(widths), device=DEV,
                                       dtype=torch.bfloat16).mul_(rank ** -0.5)
        self.ranks = torch.full((num_slots,), rank, dtype=torch.int32, device=DEV)
        self.scales = torch.full((num_slots,), 2.0, dtype=torch.float32, device=DEV)

    def adapter_bytes(self) -> int:
        return sum((self.a[g][0].numel() + self.b[g][0].numel()) * 2 for g in GROUPS)


def offsets_of(widths):
    return tuple([0] + [sum(widths[: i + 1]) for i in range(len(widths))])


def make_sets(tokens, adapters, num_sets, rank_pool_slots=POOL_SLOTS):
    """K metadata sets, tokens split evenly over `adapters` segments, disjoint slots per set."""
    base, extra = divmod(tokens, adapters)
    lens = [base + (1 if i < extra else 0) for i in range(adapters)]
    indptr = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(adapters)], dtype=torch.int32, device=DEV)
    sets = []
    perm = torch.randperm(rank_pool_slots)
    for k in range(num_sets):
        slots = perm[(k * adapters) % rank_pool_slots:][:adapters]
        tok_slot = torch.repeat_interleave(slots, torch.tensor(lens)).to(DEV)
        sets.append({"indptr": indptr, "slots": slots.to(torch.int32).to(DEV), "lens": lens,
                         "slot_list": slots.tolist(), "tok_slot": tok_slot})
    return sets


class Layer:
    """Activations of one layer step: inputs per group, y buffers (fp32), outputs."""

    def __init__(self, tokens, rank):
        self.x = {g: torch.randn(tokens, h, device=DEV, dtype=torch.bfloat16) for g, (h, _) in GROUPS.items()}
        self.y = {g: torch.empty(tokens, len(w), rank, device=DEV, dtype=torch.float32) for g, (_, w) in GROUPS.items()}
        self.out = {g: torch.randn(tokens, sum(w), device=DEV, dtype=torch.bfloat16) for g, (_, w) in GROUPS.items()}

    def act_bytes(self, tokens, rank):
        total = 0
        for (h, w) in GROUPS.values():
            total += tokens * h * 2 + 2 * tokens * len(w) * rank * 4 + 2 * tokens * sum(w) * 2
        return total


def ours_step(pools, layer, meta, shrink_cfg=None, expand_cfg=None, groups=GROUPS):
    """One layer's LoRA; with OPENLORA_FUSED_DECODE=1 the groups the engine would fuse take the fused
    decode kernel (kernels/lora_decode.py), the others shrink + expand."""
    tokens = layer.x["qkv"].shape[0]
    block_t = pick_block_t(tokens, len(meta["lens"]))
    for g in groups:
        h_in, widths = GROUPS[g]
        if fused_decode_enabled() and not (shrink_cfg or expand_cfg) and fused_decode_fits(block_t, pools.rank,
                                                                                             h_in, 2):
            lora_decode(layer.x[g], pools.a[g], pools.b[g], offsets_of(widths), meta["indptr"], meta["slots"],
                        pools.ranks, pools.scales, layer.out[g], block_t=block_t, rank_bound=pools.rank)
            continue
        sgmv_shrink(layer.x[g], pools.a[g], meta["indptr"], meta["slots"], pools.ranks, layer.y[g],
                    config=(shrink_cfg or {}).get(g))
        sgmv_expand(layer.y[g], pools.b[g], offsets_of(widths), meta["indptr"], meta["slots"], pools.ranks,
                    pools.scales, layer.out[g], config=(expand_cfg or {}).get(g))


def bmm_step(pools, layer, meta):
    idx = meta["tok_slot"]
    scale = pools.scales[idx][:, None]
    for g, (h_in, widths) in GROUPS.items():
        r = pools.rank
        a_tok = pools.a[g].view(pools.a[g].shape[0], -1, h_in)[idx]              # [T, M*R, H_in]
        y = torch.bmm(a_tok, layer.x[g][:, :, None])                              # [T, M*R, 1]
        b_tok = pools.b[g][idx]                                                    # [T, R, N]
        offs = offsets_of(widths)
        for m in range(len(widths)):
            y_m = y[:, m * r:(m + 1) * r].transpose(1, 2)                          # [T, 1, R]
            delta = torch.bmm(y_m, b_tok[:, :, offs[m]:offs[m + 1]]).squeeze(1)
            layer.out[g][:, offs[m]:offs[m + 1]] += (scale * delta).to(torch.bfloat16)


def loop_step(pools, layer, meta):
    start = 0
    for n, slot in zip(meta["lens"], meta["slot_list"]):
        end = start + n
        for g, (h_in, widths) in GROUPS.items():
            a = pools.a[g][slot].view(-1, h_in)
            y = layer.x[g][start:end] @ a.t()
            offs = offsets_of(widths)
            for m in range(len(widths)):
                b = pools.b[g][slot, :, offs[m]:offs[m + 1]]                        # [R, N_m]
                layer.out[g][start:end, offs[m]:offs[m + 1]] += 2.0 * (y[:, m * pools.rank:(m + 1) * pools.rank] @ b)
        start = end


class Base:
    def __init__(self):
        self.w = {g: torch.randn(sum(w), h, device=DEV, dtype=torch.bfloat16) * h ** -0.5
                  for g, (h, w) in GROUPS.items()}

    def step(self, layer, outs):
        for g in GROUPS:
            torch.matmul(layer.x[g], self.w[g].t(), out=outs[g])

    def step_with_act(self, layer, outs, pools=None, meta=None, fused=False, side=None, tiles=None):
        """The layer's matmuls and the MLP's activation, as the engine runs a prompt step; with pools and
        meta, each projection's LoRA too: added after its matmul, and for gate/up either added then
        activated (fused=False) or added inside the activation (kernels/lora_silu_mul.py). With a side
        stream, each shrink runs on it beside its matmul, as the engine's graphs do
        (inference_worker/lora/layers.run_beside). tiles = (shrink, expand, activation) token tiles
        (default: the kernels' pick)."""
        cfg_s, cfg_e, cfg_a = ({"block_t": t} for t in tiles) if tiles else (None, None, None)

        def shrink(g):
            sgmv_shrink(layer.x[g], pools.a[g], meta["indptr"], meta["slots"], pools.ranks, layer.y[g], config=cfg_s)

        for g, (_h_in, widths) in GROUPS.items():
            if pools is not None and side is not None:
                run_beside(side, lambda g=g: shrink(g),
                           lambda g=g: torch.matmul(layer.x[g], self.w[g].t(), out=outs[g]))
            else:
                torch.matmul(layer.x[g], self.w[g].t(), out=outs[g])
                if pools is not None:
                    shrink(g)
            if g == "gate_up":
                if pools is not None and fused:
                    outs["act"] = lora_silu_mul(layer.y[g], pools.b[g], outs[g], meta["indptr"], meta["slots"],
                                                pools.ranks, pools.scales, config=cfg_a)
                    continue
                if pools is not None:
                    sgmv_expand(layer.y[g], pools.b[g], offsets_of(widths), meta["indptr"], meta["slots"],
                                pools.ranks, pools.scales, outs[g], config=cfg_e)
                outs["act"] = silu_and_mul(outs[g])
            elif pools is not None:
                sgmv_expand(layer.y[g], pools.b[g], offsets_of(widths), meta["indptr"], meta["slots"], pools.ranks,
                            pools.scales, outs[g], config=cfg_e)


def lora_case(pools, base, tokens, adapters, bw, node_us, do_loop=True, do_bmm=True):
    sets = make_sets(tokens, adapters, K_STEPS)
    layer = Layer(tokens, pools.rank)
    row = {"tokens": tokens, "adapters": adapters, "rank": pools.rank}
    lora_bytes = adapters * pools.adapter_bytes() + layer.act_bytes(tokens, pools.rank)
    row["floor_us"] = lora_bytes / bw * 1e6
    row["floor_4p25_us"] = lora_bytes / ISSUE_BW * 1e6
    row["bytes"] = lora_bytes
    row["ours_us"] = median_graph_us(lambda: [ours_step(pools, layer, m) for m in sets], steps=K_STEPS)
    n_nodes = 8 + sum(1 for g in GROUPS if _uses_split(tokens, adapters, g, pools.rank))
    row["nodes"] = n_nodes
    row["launch_floor_us"] = row["floor_us"] + n_nodes * node_us
    row["x_floor"] = row["ours_us"] / row["floor_us"]
    if do_bmm:
        try:
            row["bmm_us"] = median_graph_us(lambda: [bmm_step(pools, layer, m) for m in sets], steps=K_STEPS,
                                            reps=10)
        except torch.OutOfMemoryError:
            row["bmm_us"] = None
        torch.cuda.empty_cache()
    if do_loop:
        row["loop_us"] = median_eager_us(lambda: loop_step(pools, layer, sets[0]))
    outs = {g: torch.empty(tokens, sum(w), device=DEV, dtype=torch.bfloat16) for g, (_, w) in GROUPS.items()}
    row["base_us"] = median_graph_us(lambda: base.step(layer, outs), reps=20)
    row["lora_over_base"] = row["ours_us"] / row["base_us"]
    if tokens >= 1024:
        # prompt steps: the LoRA's cost inside the layer (matmuls + activation with it, minus without), the
        # median over interleaved replays (these ~1.3 ms graphs drift by tens of µs within a process)
        inter = layer_interleaved(base, pools, layer, sets[0], outs, PROMPT_REPS)
        row["prompt_interleaved"] = inter
        row["base_act_us"], row["prompt_matmuls_us"] = inter["median_us"]["base_act"], inter["median_us"]["matmuls"]
        for key, variant in (("layer_added_us", "added"), ("layer_fused_act_us", "fused"),
                             ("layer_engine_us", "engine")):
            row[key] = row["base_act_us"] + inter["lora_us"][variant]
        row["fused_act_check"] = _fused_act_error(base, pools, layer, sets[0], outs)
    return row


def layer_interleaved(base, pools, layer, meta, outs, reps: int, other_tiles=()) -> dict:
    """One prompt layer (matmuls + activation) in four variants, each a CUDA graph: without LoRA
    ("base_act"), each projection's LoRA added after its matmul ("added"), gate/up's inside the activation
    ("fused"), and that with each shrink beside its matmul on a second stream and the prompt graphs' token
    tile ("engine": what the engine's prompt graphs run); and the matmuls alone ("matmuls"). Each rep
    replays the five back to back: these ~1.2 ms graphs drift by 10-20 %
    within a process (clocks, power; 1165 -> 1399 µs seen), so a variant's LoRA cost is the median over
    reps of its time minus the base's of the same rep. -> {"median_us": {variant: µs}, "lora_us": {variant:
    median difference}, "lora_spread_us": {variant: (25th, 75th percentile)}, "reps": reps}."""
    side = torch.cuda.Stream()
    variants = {"base_act": {}, "added": {"pools": pools, "meta": meta},
                "fused": {"pools": pools, "meta": meta, "fused": True},
                "engine": {"pools": pools, "meta": meta, "fused": True, "side": side,
                           "tiles": (PROMPT_SHRINK_TILE, PROMPT_TILE, PROMPT_TILE)}}
    for tiles in other_tiles:                        # the engine's way with other (shrink, expand, act) tiles
        variants["engine " + "/".join(map(str, tiles))] = {**variants["engine"], "tiles": tiles}
    steps = [lambda kw=kw: base.step_with_act(layer, outs, **kw) for kw in variants.values()]
    graphs = [capture_graph(step) for step in steps + [lambda: base.step(layer, outs)]]
    times = replay_us(graphs, reps)
    del graphs
    names = list(variants) + ["matmuls"]             # the matmuls alone: the % base, timed alongside
    return paired_costs(names, times, names[1:-1])


def paired_costs(names: list[str], times: list[list[float]], costed: list[str]) -> dict:
    """times[rep][i]: µs of variant names[i] in one rep; names[0] is the base. -> the medians of each
    variant, and for each costed variant the median and quartiles over reps of its time minus the
    base's time of the same rep (a slow drift over the reps moves both alike and cancels)."""
    out = {"median_us": {n: statistics.median(t[i] for t in times) for i, n in enumerate(names)},
           "lora_us": {}, "lora_spread_us": {}, "reps": len(times)}
    for n in costed:
        i = names.index(n)
        diffs = sorted(t[i] - t[0] for t in times)
        out["lora_us"][n] = statistics.median(diffs)
        out["lora_spread_us"][n] = (diffs[len(diffs) // 4], diffs[(3 * len(diffs)) // 4])
    return out


def _fused_act_error(base, pools, layer, meta, outs) -> float:
    """Relative difference of the activations the two gate/up orders give (bf16: a few roundings)."""
    base.step_with_act(layer, outs, pools, meta)
    want = outs["act"].float()
    base.step_with_act(layer, outs, pools, meta, fused=True)
    return ((outs["act"].float() - want).norm() / want.norm()).item()


def _uses_split(tokens, adapters, group, rank):
    from kernels.sgmv_shrink import default_config
    h_in, widths = GROUPS[group]
    return default_config(tokens, adapters, len(widths) * rank, rank, h_in, True)["split_k"] > 1


def _one_op(op, g, widths, layer, pools, cfg):
    """One group's shrink or expand over metadata m, with block-size overrides cfg."""
    if op == "shrink":
        return lambda m: sgmv_shrink(layer.x[g], pools.a[g], m["indptr"], m["slots"], pools.ranks,
                                     layer.y[g], config=cfg)
    return lambda m: sgmv_expand(layer.y[g], pools.b[g], offsets_of(widths), m["indptr"], m["slots"],
                                 pools.ranks, pools.scales, layer.out[g], config=cfg)


def sweep_case(pools, tokens, adapters, shrink_cfgs, expand_cfgs, log):
    """Times each group's shrink and expand alone over config lists; returns the best per group/op."""
    sets = make_sets(tokens, adapters, K_STEPS)
    layer = Layer(tokens, pools.rank)
    best = {}
    for g, (_h_in, widths) in GROUPS.items():
        for op, cfgs in (("shrink", shrink_cfgs), ("expand", expand_cfgs)):
            results = []
            for cfg in [None] + cfgs:
                try:
                    fn = _one_op(op, g, widths, layer, pools, cfg)
                    us = median_graph_us(lambda fn=fn: [fn(m) for m in sets], steps=K_STEPS, reps=20)
                except Exception as exc:  # noqa: BLE001 - a bad config is a data point
                    us = float("inf")
                    log.append(f"sweep {tokens}x{adapters} r{pools.rank} {g} {op} {cfg}: {exc!r}"[:300])
                results.append((us, cfg))
            results.sort(key=lambda r: r[0])
            default_us = next(us for us, c in results if c is None)
            best[f"{g}.{op}"] = {"best_us": results[0][0], "best_cfg": results[0][1], "default_us": default_us,
                                     "all": [(round(u, 2), c) for u, c in results]}
            print(f"  sweep T={tokens} A={adapters} r{pools.rank} {g:8s} {op:6s} default {default_us:7.2f} us  "
                  f"best {results[0][0]:7.2f} us {results[0][1]}", flush=True)
    return best


def attention_case(batch, ctx, bw, head_dim=128, heads=32, kv_heads=8, block_size=16, **kw):
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * blocks_per_seq + 1
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = torch.randperm(num_blocks - 1, device=DEV)[: batch * blocks_per_seq].view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(batch, heads, head_dim, device=DEV, dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    ours = median_graph_us(lambda: paged_attention_decode(q, kc, vc, bt, lens, scale, **kw), reps=30)

    def sdpa():
        k = kc[bt.long()].view(batch, -1, kv_heads, head_dim)[:, :ctx].transpose(1, 2)
        v = vc[bt.long()].view(batch, -1, kv_heads, head_dim)[:, :ctx].transpose(1, 2)
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
    try:
        ref = median_graph_us(sdpa, reps=10)
    except Exception:  # noqa: BLE001
        ref = None
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * 2
    return {"batch": batch, "ctx": ctx, "head_dim": head_dim, "cfg": kw, "ours_us": ours, "sdpa_gather_us": ref,
                "floor_us": kv_bytes / bw * 1e6, "x_floor": ours / (kv_bytes / bw * 1e6)}


def in_layer(row, key):
    """The LoRA's cost inside a prompt layer: matmuls + activation with it, minus without it."""
    return row[key] - row["base_act_us"]


def fmt(v, nd=1):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/kernels-h200.json")
    ap.add_argument("--quick", action="store_true", help="few cases (smoke run)")
    ap.add_argument("--sweep", action="store_true", help="also sweep block sizes on key cases")
    ap.add_argument("--no-loop", action="store_true")
    ap.add_argument("--ranks", default="16,8,64", help="adapter ranks of the LoRA cases, in order")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--mini-sweep", action="store_true", help="a few decode shrink variants (notes)")
    ap.add_argument("--markdown", metavar="JSON", help="only write the .md of --out from these results (CPU)")
    args = ap.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            write_markdown(json.load(f), os.path.splitext(args.out)[0] + ".md")
        return
    import triton
    log = []
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        commit = git.stdout.strip() if git.returncode == 0 else None      # None: no commit yet
    except Exception:  # noqa: BLE001
        commit = None
    res = start_report(torch=torch.__version__, triton=triton.__version__, commit=commit, lora=[], attention=[],
                       sweeps={})
    bw = copy_bandwidth()
    node_us = empty_node_us()
    res["copy_bw_TBps"], res["graph_node_us"] = bw / 1e12, node_us
    res["copy_variants_TBps"] = dict(COPY_VARIANTS)
    print(f"copy variants (TB/s, read+write): {COPY_VARIANTS}", flush=True)
    print(f"device {res['device']}  copy bw {bw / 1e12:.2f} TB/s  graph kernel node {node_us:.2f} us", flush=True)

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(res, log=log), f, indent=1, default=str)
        write_markdown(res, os.path.splitext(args.out)[0] + ".md")

    decode_pairs = [(1, 1), (16, 1), (16, 16), (64, 1), (64, 8), (64, 64), (256, 1), (256, 16), (256, 64),
                    (256, 256)]
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.quick:
        decode_pairs, ranks = [(64, 64), (256, 256)], [16]
    base = Base()

    def run_rank(rank):
        pools = Pools(rank)
        if args.sweep and rank == 16:
            from bench import sgmv_sweep  # the block-size sweep the defaults came from
            res["sweeps"].update(sgmv_sweep.sweep_all(log))
            save()
        if args.mini_sweep and rank == 16:
            mini = [{"block_t": 1, "block_n": 4, "block_k": bk, "split_k": sk, "num_warps": w}
                    for bk, sk, w in ((1024, 1, 4), (512, 1, 4), (1024, 1, 8), (1024, 2, 4), (512, 4, 4))]
            mini_e = [{"block_t": 1, "block_n": 512, "block_r": 16, "nb_per_prog": 1, "num_warps": 4}]
            res["sweeps"]["mini_decode_64x64_r16"] = sweep_case(pools, 64, 64, mini, mini_e, log)
            save()
        cases = [(t, a) for t, a in decode_pairs] + [(2048, 8)]
        for tokens, adapters in cases:
            try:
                row = lora_case(pools, base, tokens, adapters, bw, node_us,
                                do_loop=not args.no_loop, do_bmm=True)
                row["kind"] = "prefill" if tokens >= 1024 else "decode"
                res["lora"].append(row)
                print(f"T={tokens:5d} A={adapters:4d} r={rank:3d}  ours {row['ours_us']:8.1f} us  floor "
                      f"{row['floor_us']:7.1f}  x{row['x_floor']:5.2f}  (a) {fmt(row.get('loop_us'), 0)}  "
                      f"(b) {fmt(row.get('bmm_us'))}  base {row['base_us']:7.1f}  "
                      f"lora/base {100 * row['lora_over_base']:5.1f}%", flush=True)
                if "layer_engine_us" in row:
                    mm = row["prompt_matmuls_us"]
                    print(f"  in the layer (matmuls {mm:.1f} us, + activation {row['base_act_us']:.1f}):"
                          f" LoRA added after each matmul +{in_layer(row, 'layer_added_us'):.1f} us, gate/up's in "
                          f"the activation +{in_layer(row, 'layer_fused_act_us'):.1f} us, with the shrinks beside "
                          f"the matmuls (the engine) +{in_layer(row, 'layer_engine_us'):.1f} us "
                          f"({100 * in_layer(row, 'layer_engine_us') / mm:.1f}% of the matmuls; "
                          f"activations differ by {row['fused_act_check']:.1e})", flush=True)
            except Exception as exc:  # noqa: BLE001
                log.append(f"case {tokens}x{adapters} r{rank}: {traceback.format_exc()}"[-2000:])
                print(f"T={tokens} A={adapters} r={rank} FAILED {exc!r}", flush=True)
            save()
        del pools
        torch.cuda.empty_cache()

    def run_attention():
        attn_cases = [(1, 4096), (16, 2048), (64, 1024), (64, 4096), (256, 1024), (256, 4096)]
        if args.quick:
            attn_cases = [(64, 1024)]
        for batch, ctx in attn_cases:
            variants = [{}]
            if args.sweep:
                variants += [{"partition": p, "block_n": bn} for p in (256, 512, 1024) for bn in (32, 64)]
            for kw in variants:
                try:
                    row = attention_case(batch, ctx, bw, **kw)
                    res["attention"].append(row)
                    print(f"attn B={batch:4d} ctx={ctx:5d} {kw}  ours {row['ours_us']:7.1f} us  sdpa+gather "
                          f"{fmt(row['sdpa_gather_us'])}  floor {row['floor_us']:6.1f}  x{row['x_floor']:.2f}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    log.append(f"attn {batch}x{ctx} {kw}: {traceback.format_exc()}"[-2000:])
                    print(f"attn B={batch} ctx={ctx} {kw} FAILED {exc!r}", flush=True)
            save()
            torch.cuda.empty_cache()
    run_rank(ranks[0])
    if not args.no_attention:
        run_attention()
    for rank in ranks[1:]:
        run_rank(rank)
    save()
    write_markdown(res, os.path.splitext(args.out)[0] + ".md")
    print_table(res)


def achieved_tbps(row: dict) -> float:
    """A LoRA case's floor bytes over its time, TB/s."""
    return row["bytes"] / row["ours_us"] / 1e6


def print_table(res):
    print(f"\n{res['device']}  copy {res['copy_bw_TBps']:.2f} TB/s  node {res['graph_node_us']:.2f} us")
    print(f"{'T':>5} {'A':>4} {'r':>3} {'ours':>7} {'TB/s':>5} {'floor':>7} {'x':>5} {'fl4.25':>7} {'x':>5} "
          f"{'(a)':>8} {'(b)':>8} {'base':>7} {'%base':>6}")
    for r in res["lora"]:
        print(f"{r['tokens']:5d} {r['adapters']:4d} {r['rank']:3d} {r['ours_us']:7.1f} "
              f"{achieved_tbps(r):5.2f} {r['floor_us']:7.1f} "
              f"{r['x_floor']:5.2f} {r['floor_4p25_us']:7.1f} {r['ours_us'] / r['floor_4p25_us']:5.2f} "
              f"{fmt(r.get('loop_us'), 0):>8} {fmt(r.get('bmm_us')):>8} {r['base_us']:7.1f} "
              f"{100 * r['lora_over_base']:6.1f}")
    for r in res["attention"]:
        if not r["cfg"]:
            print(f"attn B={r['batch']} ctx={r['ctx']}: {r['ours_us']:.1f} us (sdpa+gather "
                  f"{fmt(r['sdpa_gather_us'])}, floor {r['floor_us']:.1f})")


def write_markdown(res, path):
    lines = [f"# Kernel benchmark: {res['device']}", "",
             (f"{res['date']}, torch {res['torch']}, triton {res['triton']}, commit {res['commit']}; "
             f"copy bandwidth {res['copy_bw_TBps']:.2f} TB/s (read+write), one graph kernel node "
             f"{res['graph_node_us']:.2f} µs. Command: `{res.get('command', 'python3 bench/kernels.py')}`. "
             "Achieved = the bytes of the floor over ours. "
             "Floor = (distinct A/B bytes + activations) / bandwidth; floor + launches adds one graph kernel "
             "node per launch (8, plus one that zeroes y for each split-K shrink), the cost of the launches alone."), "",
             "LoRA of one Llama-3-8B layer (7 projections, 8 SGMV launches), CUDA graph, µs per layer step:", "",
             ("| tokens | adapters | rank | ours | achieved TB/s | floor | ours/floor | floor @4.25 TB/s | ours/that "
             "| floor + launches | ours/that | (a) loop | (b) bmm | base matmuls | ours/base |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["lora"]:
        lines.append(f"| {r['tokens']} | {r['adapters']} | {r['rank']} | {r['ours_us']:.1f} | "
                     f"{achieved_tbps(r):.2f} | {r['floor_us']:.1f} | "
                     f"{r['x_floor']:.2f} | {r['floor_4p25_us']:.1f} | {r['ours_us'] / r['floor_4p25_us']:.2f} | "
                     f"{r['launch_floor_us']:.1f} | {r['ours_us'] / r['launch_floor_us']:.2f} | "
                     f"{fmt(r.get('loop_us'), 0)} | {fmt(r.get('bmm_us'))} | "
                     f"{r['base_us']:.1f} | {100 * r['lora_over_base']:.1f}% |")
    prompt = [r for r in res["lora"] if "layer_engine_us" in r]
    if prompt:
        lines += ["", "Prompt steps: the LoRA's cost inside the layer (its matmuls and the MLP's activation, with "
                  f"the LoRA minus without: the median over {PROMPT_REPS} interleaved replays of each variant's "
                  "time minus the base's of the same replay), µs and % of the base matmuls (timed alongside): "
                  "each projection's LoRA added after its matmul; gate/up's added inside the "
                  "activation (kernels/lora_silu_mul.py); and that with each shrink on a second stream beside "
                  "its matmul (the engine's prompt graphs):",
                  "", "| tokens | adapters | rank | matmuls | + activation | added after | % | gate/up in the "
                  "activation | % | + shrinks beside (engine) | % |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in prompt:
            cells = [in_layer(r, k) for k in ("layer_added_us", "layer_fused_act_us", "layer_engine_us")]
            mm = r["prompt_matmuls_us"]
            lines.append(f"| {r['tokens']} | {r['adapters']} | {r['rank']} | {mm:.1f} | {r['base_act_us']:.1f} | " +
                         " | ".join(f"{c:.1f} | {100 * c / mm:.1f}%" for c in cells) + " |")
    if not res["attention"]:
        lines += ["", "Paged decode attention: not run in this call (`--no-attention`)."]
    else:
        lines += ["", "Paged decode attention (Hq 32, Hkv 8, bf16, block 16), µs:", "",
                  "| batch | context | head dim | ours | gather + SDPA | KV floor | ours/floor |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["attention"]:
        if not r["cfg"]:
            lines.append(f"| {r['batch']} | {r['ctx']} | {r['head_dim']} | {r['ours_us']:.1f} | "
                         f"{fmt(r['sdpa_gather_us'])} | {r['floor_us']:.1f} | {r['x_floor']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
