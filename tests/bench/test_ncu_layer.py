"""bench/ncu_layer.py's summary of Nsight Compute's raw CSV: units converted, labels matched in order."""
import json

from bench.ncu_layer import summarize

CSV = """==PROF== Connected to process 1
"ID","Kernel Name","gpu__time_duration.sum","dram__bytes.sum.per_second","launch__grid_size","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"
"","","ns","Gbyte/s","","inst","inst"
"0","_sgmv_shrink_kernel","2,500","2,000","1,216","3.5","0.5"
"1","_sgmv_expand_kernel","4000","1000","96","1.0","2.0"
"""


def test_summary_converts_units_and_labels_launches(tmp_path):
    (tmp_path / "ncu.csv").write_text(CSV)
    (tmp_path / "labels.json").write_text(json.dumps(["1x1x16 qkv.shrink", "1x1x16 qkv.expand"]))
    summarize(str(tmp_path / "ncu.csv"), str(tmp_path / "labels.json"), str(tmp_path / "out"), "a note")
    rows = json.loads((tmp_path / "out.json").read_text())["launches"]
    assert rows[0]["launch"] == "1x1x16 qkv.shrink" and rows[0]["us"] == 2.5 and rows[0]["grid"] == 1216
    assert rows[0]["dram_TB/s"] == 2.0 and rows[0]["dram_MB"] == 5.0                  # 2 TB/s x 2.5 µs
    assert rows[0]["stalls"].startswith("long_scoreboard 3.5") and rows[1]["stalls"].startswith("barrier 2.0")
    assert rows[1]["occ_%"] is None                                                  # not in the CSV
    assert "a note" in (tmp_path / "out.md").read_text()
