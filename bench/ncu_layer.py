"""Hardware counters of one layer's LoRA launches (issue 7), for Nsight Compute.

Runs each case's 8 SGMV launches (bench/kernels.py's ours_step: the four shrinks and expands of a
Llama-3-8B layer, the engine's default configs) once to compile, then once between
cudaProfilerStart/Stop, and writes the launches' labels in profiled order. Under ncu:

    ncu --clock-control none --profile-from-start off -k regex:sgmv --section SpeedOfLight \\
        --section LaunchStats --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        -f -o ncu-layer python3 bench/ncu_layer.py --labels labels.json
    ncu --import ncu-layer.ncu-rep --csv --page raw > ncu.csv
    python3 bench/ncu_layer.py --summarize ncu.csv --labels labels.json --out bench/results/ncu-layer-h200

ncu times each launch alone with a flushed L2 (no graph, no overlap with its neighbours): a launch's
duration there is its own work, which is what says whether it moves bytes at the rate the floor assumes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# metric -> column name in the summary
METRICS = {
    "gpu__time_duration.sum": "us",
    "dram__bytes.sum.per_second": "dram_TB/s",
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": "dram_%",
    "lts__t_sector_hit_rate.pct": "l2_hit_%",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_%",
    "launch__grid_size": "grid",
    "launch__registers_per_thread": "regs",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occ_%",
    "smsp__average_warp_latency_per_inst_issued.ratio": "cyc/inst",
}
CASES = "256x64x16,256x16x16,16x1x16,64x8x16,64x64x16,256x64x8,64x8x64"


def run(cases: str, labels_path: str) -> None:
    import torch

    import bench.kernels as bk
    labels = []
    for case in cases.split(","):
        tokens, adapters, rank = (int(v) for v in case.split("x"))
        pools = bk.Pools(rank, num_slots=max(adapters, 16))
        layer = bk.Layer(tokens, rank)
        meta = bk.make_sets(tokens, adapters, 1, rank_pool_slots=max(adapters, 16))[0]
        bk.ours_step(pools, layer, meta)                  # compiles every variant first
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        bk.ours_step(pools, layer, meta)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        labels += [f"{case} {g}.{op}" for g in bk.GROUPS for op in ("shrink", "expand")]
        del pools, layer
        torch.cuda.empty_cache()
    with open(labels_path, "w") as f:
        json.dump(labels, f)


def summarize(csv_path: str, labels_path: str, out: str, note: str = "") -> None:
    """ncu's raw CSV (one row a launch) + the labels -> a markdown table and JSON."""
    with open(csv_path) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    rows = list(csv.DictReader(lines[start:]))
    units = rows[0]
    rows = [r for r in rows[1:] if r.get("ID", "").isdigit()]   # the row after the header holds units
    labels = json.load(open(labels_path))
    if len(labels) != len(rows):
        raise SystemExit(f"{len(rows)} profiled launches but {len(labels)} labels")
    table = []
    for label, r in zip(labels, rows):
        entry = {"launch": label, "dram_MB": None}
        for metric, col in METRICS.items():
            v = r.get(metric, "")
            try:
                x = float(v.replace(",", ""))
            except ValueError:
                entry[col] = None
                continue
            unit = units.get(metric, "")
            if col == "us":
                x = x / 1000 if unit == "ns" else x * 1000 if unit == "ms" else x
            elif col == "dram_TB/s":
                x = x * {"Gbyte/s": 1e-3, "Mbyte/s": 1e-6}.get(unit, 1.0)
            entry[col] = round(x, 2)
        if entry["us"] is not None and entry["dram_TB/s"] is not None:
            entry["dram_MB"] = round(entry["us"] * entry["dram_TB/s"], 2)     # TB/s x µs = MB
        # where the warps wait: the largest stall reasons (WarpStateStats' cycles per issued instruction)
        stalls = {}
        for k, v in r.items():
            if "_issue_stalled_" in k and k.endswith("per_issue_active.ratio") and "not_issued" not in k:
                try:
                    stalls[k.split("stalled_")[1].removesuffix("_per_issue_active.ratio")] = float(v.replace(",", ""))
                except ValueError:
                    pass
        entry["stalls"] = ", ".join(f"{k} {v:.1f}" for k, v in sorted(stalls.items(), key=lambda kv: -kv[1])[:3])
        table.append(entry)
    with open(out + ".json", "w") as f:
        json.dump({"csv": os.path.basename(csv_path), "metrics": sorted(units), "launches": table}, f, indent=1)
    cols = list(METRICS.values()) + ["dram_MB", "stalls"]
    md = [f"# Nsight Compute: one layer's LoRA launches ({os.path.basename(csv_path)})", "",
          "Each launch alone under ncu (L2 flushed, no graph, no PDL overlap): bench/ncu_layer.py's module docstring. "
          "Labels: tokens x adapters x rank, group.op. dram_MB = DRAM bytes moved (rate x time); stalls: "
          "the largest WarpStateStats reasons, cycles per issued instruction." + (f" {note}" if note else ""), "",
          "| launch | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    md += ["| " + e["launch"] + " | " + " | ".join("-" if e[c] is None else e[c] if isinstance(e[c], str) else f"{e[c]:g}" for c in cols) + " |"
           for e in table]
    with open(out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=CASES, help="tokens x adapters x rank, comma-separated")
    ap.add_argument("--labels", default="ncu-labels.json")
    ap.add_argument("--summarize", default="", help="ncu's --csv --page raw output to turn into a table")
    ap.add_argument("--out", default="ncu-layer", help="with --summarize: the table's path, no extension")
    ap.add_argument("--note", default="", help="with --summarize: a line for the table's header (device, commit)")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize, args.labels, args.out, args.note)
    else:
        run(args.cases, args.labels)


if __name__ == "__main__":
    main()
