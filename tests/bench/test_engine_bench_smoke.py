"""bench/engine.py --quick on the CPU: every workload runs and the report is complete."""
from __future__ import annotations

import json

from bench import engine as bench_engine


def test_quick_bench_writes_report(tmp_path):
    out = tmp_path / "engine-cpu.json"
    report = bench_engine.main(["--quick", "--cprofile", "5", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["workloads"].keys() == {"S0", "S1", "S100", "S1000"}
    args = saved["args"]
    for name, res in saved["workloads"].items():
        assert "error" not in res, (name, res)
        assert res["output_tokens"] == args["requests"] * args["output_len"]
        assert res["decode_steps"] > 0 and res["decode_floor_ms_p50"] > 0
        # the wall time split: steps that ran plus the rest, and the slowest steps, longest first
        assert abs(res["decode_steps_s"] + res["mixed_steps_s"] + res["outside_steps_s"] - res["wall_s"]) < 1e-6
        # the host phases of a step (bench/step_phases.py): measured, disjoint (what is left of
        # each step's wall time is never negative: a phase counted twice would make it so)
        phases = res["host_phases_ms_p50"]["decode"]
        assert phases["forward"] > 0 and phases["prepare"] > 0 and phases["schedule"] > 0
        assert phases["other"] >= 0
        slowest = [s["time_ms"] for s in res["slowest_steps"]]
        top = [f["tottime_s"] for f in res["cprofile_top"]]          # --cprofile: the busiest, busiest first
        assert len(top) == 5 and top == sorted(top, reverse=True) and top[0] > 0
        assert slowest == sorted(slowest, reverse=True) and 0 < len(slowest) <= res["steps"]
    assert saved["workloads"]["S0"]["adapter_loads"] == 0
    s1000 = saved["workloads"]["S1000"]
    assert s1000["adapter_loads"] >= 1
    # a load's host time: from its request to its copies issued, the loader queue a part of it
    assert 0 <= s1000["load_queue_ms_p50"] <= s1000["load_host_ms_p50"] and s1000["load_host_ms_p99"] > 0
    assert 0 < s1000["load_issue_ms_p50"] <= s1000["load_issue_ms_p99"] <= s1000["load_host_ms_p99"]   # a part of it
    assert "S100_over_S0" in saved["ratios"]
    for key in ("device", "date", "commit", "command", "torch", "triton", "copy_bw_TBps"):
        assert key in saved
    table = out.with_suffix(".md").read_text()
    assert "| S1000 |" in table and report["device"] == "cpu" and "Where the wall time went" in table
    assert "Host phases of engine.step()" in table and "busiest host functions" in table
