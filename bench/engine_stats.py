"""Per-step records of bench/engine.py and the printed table.

StepRecorder wraps the engine's runner (prepare: what the step holds; forward: CUDA
events around the model, read after the run so no step syncs for them) and times each
engine.step() on the host. A decode-only step's floor is the bytes it must read over
the copy bandwidth: base weights (all but the embedding table, of which a step reads a
few rows) + the batch's KV cache + A/B of each distinct adapter in the step.
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.step_phases import PHASES, StepPhases


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


SLOWEST = 8                    # steps listed by time in each workload's summary
CPROFILE_LINES = 12            # functions listed per workload with bench/engine.py --cprofile


class StepRecorder:
    def __init__(self, engine, source, copy_bw: float) -> None:
        self.engine, self.source, self.copy_bw = engine, source, copy_bw
        model, spec = engine.model, engine.model.spec
        embed = model.embed_tokens.weight
        self.base_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                              if p is not embed or spec.tie_word_embeddings)
        self.kv_bytes_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * embed.element_size()
        self.is_cuda = engine.device.type == "cuda"
        self.steps: list[dict] = []
        self._pending: dict = {}
        runner = engine.runner
        prepare, forward = runner.prepare, runner.forward

        def recording_prepare(prefills, decodes):
            batch = prepare(prefills, decodes)
            self._pending = {"prefill_tokens": sum(s.num_tokens for s in prefills), "prefills": len(prefills),
                             "decodes": len(decodes), "context": sum(s.num_tokens for s in decodes),
                             "adapters": sorted({s.adapter_key for s in batch.seqs if s.slot >= 0}),
                             "graph": batch.graph_bucket is not None}
            return batch

        def timed_forward(batch):
            if not self.is_cuda:
                return forward(batch)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = forward(batch)
            end.record()
            self._pending["events"] = (start, end)
            return logits

        runner.prepare, runner.forward = recording_prepare, timed_forward
        self.phases = StepPhases(engine)

    def reset(self) -> None:
        self.steps = []

    def timed_step(self) -> bool:
        start = time.perf_counter()
        ran = self.engine.step()
        elapsed = time.perf_counter() - start
        phases = self.phases.take()
        if ran and self._pending:
            self._pending["time_ms"] = elapsed * 1e3
            self._pending["host_ms"] = phases
            self.steps.append(self._pending)
        self._pending = {}
        return ran

    def floor_ms(self, step: dict) -> float:
        adapter_bytes = sum(self.source.adapter_bytes(key) for key in step["adapters"])
        return (self.base_bytes + step["context"] * self.kv_bytes_per_token + adapter_bytes) / self.copy_bw * 1e3

    def summary(self, wall: float) -> dict:
        for s in self.steps:
            start_end = s.pop("events", None)
            if start_end is not None:
                s["gpu_ms"] = start_end[0].elapsed_time(start_end[1])
        decode = [s for s in self.steps if s["prefills"] == 0]
        times = [s["time_ms"] for s in decode]
        mixed_steps = [s for s in self.steps if s["prefills"]]
        mixed = [s["time_ms"] for s in mixed_steps]
        floors = [self.floor_ms(s) for s in decode]
        sizes = [s["prefills"] + s["decodes"] for s in self.steps]
        window = max(1, len(sizes) // 24)
        res = {"steps": len(self.steps), "steps_per_s": len(self.steps) / wall, "decode_steps": len(decode),
               "decode_graph_fraction": sum(s["graph"] for s in decode) / max(1, len(decode)),
               "decode_step_ms_p50": pct(times, 50), "decode_step_ms_p99": pct(times, 99),
               "decode_floor_ms_p50": pct(floors, 50),
               "decode_x_floor_p50": pct([t / f for t, f in zip(times, floors)], 50),
               "decode_gpu_ms_p50": pct([s["gpu_ms"] for s in decode if "gpu_ms" in s], 50),
               "decode_adapters_p50": pct([len(s["adapters"]) for s in decode], 50),
               "mixed_step_ms_p50": pct(mixed, 50), "mixed_step_ms_p99": pct(mixed, 99),
               # where the wall time went: engine.step() calls that ran (decode, prompt-heavy), the rest
               # (the harness idle or waiting), and the slowest steps (a stall shows here)
               "decode_steps_s": sum(times) / 1e3, "mixed_steps_s": sum(mixed) / 1e3,
               "outside_steps_s": wall - sum(s["time_ms"] for s in self.steps) / 1e3,
               "slowest_steps": [{"time_ms": round(s["time_ms"], 2), "gpu_ms": round(s.get("gpu_ms", 0.0), 2),
                                  "prefill_tokens": s["prefill_tokens"], "prefills": s["prefills"],
                                  "decodes": s["decodes"], "adapters": len(s["adapters"]), "graph": s["graph"]}
                                 for s in sorted(self.steps, key=lambda s: -s["time_ms"])[:SLOWEST]],
               "batch_mean": statistics.fmean(sizes) if sizes else None, "batch_p50": pct(sizes, 50),
               "batch_min": min(sizes, default=None), "batch_max": max(sizes, default=None),
               "batch_series": [round(statistics.fmean(sizes[i:i + window]), 1) for i in range(0, len(sizes), window)],
               "host_phases_ms_p50": {"decode": phase_medians(decode),
                                      "mixed": phase_medians(mixed_steps)}}
        return res


def phase_medians(steps: list[dict]) -> dict[str, float | None]:
    """p50 of each host phase over `steps`, and of the rest of their wall time ("other")."""
    res = {phase: pct([s["host_ms"][phase] for s in steps], 50) for phase in PHASES}
    res["other"] = pct([s["time_ms"] - sum(s["host_ms"].values()) for s in steps], 50)
    return res


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summarize(report: dict) -> str:
    """Markdown: header lines, one row per workload, ratios, baseline."""
    lines = [f"Engine benchmark: {report['args']['model']} on {report['device']} ({report['kernels']} kernels), "
             f"{report['date']}, commit {report['commit']}",
             f"`{report['command']}`; torch {report['torch']}, triton {report['triton']}; copy bandwidth "
             f"{report['copy_bw_TBps']:.2f} TB/s (read+write); base weights {report['base_weight_gib']:.2f} GiB; "
             f"CUDA-graph buckets {report['graph_buckets'] or 'off'}", "",
             "| workload | tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | steps/s | decode step p50 ms | floor ms | "
             "x floor | GPU fwd ms | graph % | batch mean | adapters/step | loads | load p50/p99 ms | "
             "steps waiting on a load | mem GiB |",
             "|" + "---|" * 16]
    for name, r in report["workloads"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * 14)
            continue
        lines.append(
            f"| {name} | {_fmt(r['tok_per_s'], 0)} | {_fmt(r['ttft_ms_p50'], 0)}/{_fmt(r['ttft_ms_p99'], 0)} | "
            f"{_fmt(r['tpot_ms_p50'], 2)}/{_fmt(r['tpot_ms_p99'], 2)} | {_fmt(r['steps_per_s'], 0)} | "
            f"{_fmt(r['decode_step_ms_p50'], 2)} | {_fmt(r['decode_floor_ms_p50'], 2)} | "
            f"{_fmt(r['decode_x_floor_p50'], 2)} | {_fmt(r['decode_gpu_ms_p50'], 2)} | "
            f"{_fmt(100 * r['decode_graph_fraction'], 0)} | {_fmt(r['batch_mean'])} | {_fmt(r['decode_adapters_p50'])} | "
            f"{r['adapter_loads']} | {_fmt(r['load_ms_p50'], 2)}/{_fmt(r['load_ms_p99'], 2)} | "
            f"{_fmt(r.get('steps_waiting_on_loads'))} | {_fmt(r.get('gpu_mem_peak_gib'))} |")
    timed = {name: r for name, r in report["workloads"].items() if "decode_steps_s" in r}
    if timed:
        lines += ["", "Where the wall time went (s): decode steps + prompt-heavy steps + outside steps; "
                  "the slowest step (ms, its prompt tokens / decodes):"]
        for name, r in timed.items():
            worst = r["slowest_steps"][0] if r["slowest_steps"] else {}
            lines.append(f"- {name}: {r['decode_steps_s']:.2f} + {r['mixed_steps_s']:.2f} + "
                         f"{r['outside_steps_s']:.2f} of {r['wall_s']:.2f}; slowest "
                         f"{_fmt(worst.get('time_ms'))} ms ({worst.get('prefill_tokens', '-')} / "
                         f"{worst.get('decodes', '-')})")
    phased = {name: r["host_phases_ms_p50"] for name, r in timed.items() if "host_phases_ms_p50" in r}
    if phased:
        lines += ["", "Host phases of engine.step(), p50 ms, decode steps | prompt-heavy steps "
                  f"(bench/step_phases.py): {', '.join(PHASES)}, other:"]
        for name, kinds in phased.items():
            lines.append(f"- {name}: " + " | ".join(
                " / ".join(_fmt(v, 2) for v in kinds[kind].values()) for kind in ("decode", "mixed")))
    for name, r in timed.items():
        if r.get("cprofile_top"):
            lines += ["", f"{name}: busiest host functions (cProfile, own time s / calls):"]
            lines += [f"- {f['function']}: {f['tottime_s']:.3f} / {f['calls']}" for f in r["cprofile_top"][:CPROFILE_LINES]]
    if report.get("ratios"):
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items())]
    peft = report.get("peft_baseline")
    if peft:
        lines += ["", "transformers + PEFT baseline: " + (
            peft["error"] if "error" in peft else
            f"{peft['tok_per_s_scaled']:.1f} tok/s scaled ({peft['tok_per_s_measured']:.1f} measured; {peft['note']}; "
            f"{peft['adapters']} adapters, batch {peft['batch']}, {peft['output_len']} output tokens)")]
    return "\n".join(lines)
