"""bench/serve.py --quick on the CPU: store, worker and router as processes, then the in-process engine;
the report is complete (no timing asserts)."""
from __future__ import annotations

import json

from bench import serve as bench_serve


def test_quick_serve_bench_writes_report(tmp_path):
    out = tmp_path / "serve-cpu.json"
    report = bench_serve.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    args = saved["args"]
    expected_tokens = args["requests"] * args["output_len"]
    for run in ("grpc", "inprocess"):
        res = saved[run]
        assert res["requests"] == args["requests"], (run, res)
        assert res["output_tokens"] == expected_tokens
        assert res["tok_per_s"] > 0 and res["ttft_ms_p50"] > 0 and res["tpot_ms_p50"] > 0
    grpc_res = saved["grpc"]
    assert grpc_res["errors"] == 0 and grpc_res["warmup"]["errors"] == 0
    assert grpc_res["finish_reasons"] == ["length"]
    assert sum(grpc_res["per_worker"].values()) == args["requests"]
    assert saved["ratio_tok_per_s"] > 0
    for key in ("device", "date", "commit", "command", "versions", "model", "worker_flags"):
        assert key in saved
    assert saved["device"] == report["device"] == "cpu"
    table = out.with_suffix(".md").read_text()
    assert "| in-process engine |" in table and "Ratio gRPC / in-process" in table
