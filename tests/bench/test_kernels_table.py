"""bench/kernels.py's table written from its JSON (CPU): achieved bandwidth, floor and launch-floor ratios."""
import importlib
import json


def test_markdown_from_json(tmp_path, monkeypatch):
    bk = importlib.import_module("bench.kernels")   # in the test: after the kernels' conftest picks the interpreter
    row = {"tokens": 64, "adapters": 64, "rank": 16, "ours_us": 50.0, "bytes": 150e6, "floor_us": 35.0,
           "floor_4p25_us": 35.3, "x_floor": 50.0 / 35.0, "launch_floor_us": 44.0, "loop_us": 30000.0,
           "bmm_us": 330.0, "base_us": 130.0, "lora_over_base": 50.0 / 130.0}
    res = {"device": "GPU", "date": "2026-12-03", "torch": "t", "triton": "t", "commit": "abc", "command": "cmd",
           "copy_bw_TBps": 4.26, "graph_node_us": 1.13, "lora": [row], "attention": []}
    src = tmp_path / "k.json"
    src.write_text(json.dumps(res))
    monkeypatch.setattr("sys.argv", ["kernels.py", "--markdown", str(src), "--out", str(tmp_path / "out.json")])
    bk.main()
    table = (tmp_path / "out.md").read_text()
    assert "| 64 | 64 | 16 | 50.0 | 3.00 | 35.0 | 1.43 |" in table      # 150 MB in 50 µs: 3.00 TB/s
    assert "| 44.0 | 1.14 |" in table
    assert not (tmp_path / "out.json").exists()                      # only the .md is written
