"""Cold adapter load, local disk cache -> device slot (issue 9's target: p50 <= 30 ms for a
rank-16 Llama-3-8B adapter on all 7 projections, ~84 MB).

Each load: a store blob read from local disk (`load_adapter_blob`, what the worker's disk tier
does; the file was just written, so it is in the page cache unless `--drop-caches` works
here), on CUDA copied from the file's mapping straight into page-locked buffers (what the CPU
tier holds), then copied into a device slot by the engine's SlotPool (its copy stream; the time
ends when the copy's event completes). "read" includes the pinning: "pin" (a copy per tensor
into page-locked memory before the blob reader did it) is ~0, kept so that old and new reports
compare. Every load is a new key into a full pool, so each one evicts. Phases and total,
p50/p99 over --loads loads; prints a table and writes JSON.

Usage: python bench/adapter_load.py [--loads 20] [--rank 16] [--out bench/results/adapter-load-<device>.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import git_commit, write_report  # noqa: E402
from bench.engine_setup import GEOMETRIES, PROJECTIONS  # noqa: E402
from bench.engine_stats import pct  # noqa: E402
from inference_worker.adapter_weights import load_adapter_blob  # noqa: E402
from inference_worker.lora.layers import LoRALinear  # noqa: E402
from inference_worker.lora.slot_pool import SlotPool  # noqa: E402
from kernels.backend import get_ops  # noqa: E402
from services.adapter_format import CONFIG_METADATA_KEY  # noqa: E402

PHASES = ("read_ms", "pin_ms", "issue_ms", "copy_ms", "total_ms")


def dims(geometry: str) -> dict:
    g = GEOMETRIES[geometry]
    head_dim = g["hidden_size"] // g["num_attention_heads"]
    return {"h": g["hidden_size"], "i": g["intermediate_size"], "q": g["num_attention_heads"] * head_dim,
            "kv": g["num_key_value_heads"] * head_dim, "layers": g["num_hidden_layers"]}


def write_blob(path: Path, geometry: str, rank: int) -> int:
    """A PEFT-named rank-`rank` adapter on all 7 projections as a store blob; -> bytes."""
    d = dims(geometry)
    tensors = {}
    for layer in range(d["layers"]):
        for name, (i, o) in PROJECTIONS.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, d[i]) * 0.02).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d[o], rank) * 0.02).to(torch.bfloat16)
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS), "peft_type": "LORA"}
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    return path.stat().st_size


def slot_pool(geometry: str, rank: int, device: torch.device) -> SlotPool:
    """The engine's pool for this geometry (2 slots), over meta-device base layers (no weights)."""
    d, ops = dims(geometry), get_ops(device)
    layers = []
    for layer in range(d["layers"]):
        for names, in_dim, outs in ((("q_proj", "k_proj", "v_proj"), d["h"], (d["q"], d["kv"], d["kv"])),
                                    (("o_proj",), d["q"], (d["h"],)),
                                    (("gate_proj", "up_proj"), d["h"], (d["i"], d["i"])),
                                    (("down_proj",), d["i"], (d["h"],))):
            base = nn.Linear(in_dim, sum(outs), bias=False, device="meta")
            layers.append((layer, LoRALinear(base, names, outs, ops)))
    return SlotPool(layers, 2, rank, max_tokens=1, device=device, dtype=torch.bfloat16)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def one_load(pool: SlotPool, path: Path, key: str, pin: bool, drop: bool) -> dict:
    if drop:
        drop_page_cache()
    t0 = time.perf_counter()
    weights = load_adapter_blob(path, key, pin_memory=pin)
    t1 = t2 = time.perf_counter()                 # pinning is part of the read now
    pool.acquire(key, lambda: weights)
    t3 = time.perf_counter()
    while not pool.is_loaded(key):               # the copy stream's event (at once on CPU)
        time.sleep(0.0002)
    t4 = time.perf_counter()
    pool.release(key)
    ms = 1e3
    return {"read_ms": (t1 - t0) * ms, "pin_ms": (t2 - t1) * ms, "issue_ms": (t3 - t2) * ms,
            "copy_ms": (t4 - t3) * ms, "total_ms": (t4 - t0) * ms}


def summarize(report: dict) -> str:
    lines = [f"Cold adapter load, disk -> device slot: {report['device']}, {report['date']}, commit {report['commit']}",
             f"`{report['command']}`; {report['adapter_mb']:.1f} MB blob ({report['geometry']}, rank {report['rank']}, "
             f"7 projections); page cache {'dropped before each load' if report['page_cache_dropped'] else 'warm'}; "
             f"pinned host memory: {report['pinned']} (\"read\" reads into it directly: \"pin\" is ~0)", "",
             "| phase | p50 ms | p99 ms |", "|---|---:|---:|"]
    for phase in PHASES:
        lines.append(f"| {phase[:-3]} | {report[phase]['p50']:.2f} | {report[phase]['p99']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="llama3-8b", choices=sorted(GEOMETRIES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--loads", type=int, default=20)
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each load (root)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pin = device.type == "cuda"
    pool = slot_pool(args.geometry, args.rank, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob.safetensors"
        size = write_blob(path, args.geometry, args.rank)
        drop = args.drop_caches and drop_page_cache()
        one_load(pool, path, "warmup", pin, drop)          # first-use costs (allocators, CUDA context)
        loads = [one_load(pool, path, f"adapter-{i}", pin, drop) for i in range(args.loads)]
    report = {"device": torch.cuda.get_device_name() if pin else f"cpu ({os.cpu_count()} cores)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "command": "python bench/adapter_load.py " + " ".join(argv or sys.argv[1:]),
              "geometry": args.geometry, "rank": args.rank, "adapter_mb": size / 1e6, "pinned": pin,
              "page_cache_dropped": drop, "loads": loads}
    for phase in PHASES:
        values = [load[phase] for load in loads]
        report[phase] = {"p50": pct(values, 50), "p99": pct(values, 99)}
    write_report(report, summarize(report), args.out)
    return report


if __name__ == "__main__":
    main()
