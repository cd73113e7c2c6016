"""bench/graph_width.py on CPU: the variants' segment tables and tiles (the timing needs CUDA)."""
import importlib
import json

import pytest
import torch


def _meta(lens: list[int]) -> dict:
    indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return {"indptr": indptr, "slots": torch.arange(len(lens), dtype=torch.int32), "lens": lens}


def test_variants_pad_to_the_bucket_or_the_graph_width():
    # imported in the test: bench.kernels imports the Triton launchers after the kernels' conftest
    gw = importlib.import_module("bench.graph_width")
    v = gw.variants(256, 1, 16, [_meta([256])])
    assert list(v) == ["bucket", "width", "width16", "pick"]
    widths = {name: ms[0]["slots"].shape[0] for name, (ms, _, _) in v.items()}
    assert widths == {"bucket": 256, "width": 8, "width16": 65, "pick": 1}
    assert {name: e and e["o"]["block_t"] for name, (_, _, e) in v.items()} == \
        {"bucket": 16, "width": 64, "width16": 16, "pick": None}
    bucket = v["bucket"][0][0]
    assert bucket["indptr"].tolist() == [0] + [256] * 256 and bucket["slots"][1:].eq(-1).all()
    # tiles of 1 token keep the bucket's width; 64 x 8 stays on 16-token tiles at width 17
    v = gw.variants(64, 8, 64, [_meta([8] * 8)])
    assert list(v) == ["bucket", "width", "pick"] and v["width"][0][0]["slots"].shape[0] == 17
    assert v["width"][1]["down"] == {"block_t": 16, "rank_bound": 64}
    with pytest.raises(ValueError, match="do not fit"):
        gw.padded(_meta([1] * 9), 8)


def test_run_cases_fills_prints_and_writes_the_report(monkeypatch, tmp_path, capsys):
    bk = importlib.import_module("bench.kernels")
    monkeypatch.setattr(bk, "Pools", lambda rank: type("P", (), {"rank": rank})())
    out = tmp_path / "r.json"
    report = bk.run_cases({"cases": {}}, [16, 64], [(64, 1), (256, 4)],
                          lambda pools, t, a: {"tile": 16, "us": t * a / pools.rank}, str(out))
    assert list(report["cases"]) == ["64x1x16", "256x4x16", "64x1x64", "256x4x64"]
    assert report["cases"]["256x4x64"] == {"tile": 16, "us": 16.0}
    assert "256x4x64 tile 16 us 16.00" in capsys.readouterr().out
    assert json.loads(out.read_text()) == report
