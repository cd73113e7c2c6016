"""bench/serve.py --quick on the CPU: store, worker and router as processes, then the in-process engine;
the report is complete (no timing asserts)."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from bench import serve as bench_serve
from bench.serve_setup import adapter_bytes, geometry_shapes, make_adapters
from services.store_client import WEIGHTS_FILE


@pytest.mark.parametrize("extra", [[], ["--geometry", "tiny"]])
def test_quick_serve_bench_writes_report(tmp_path, extra):
    """The tiny model with its safetensors, and a geometry whose workers draw random weights."""
    out = tmp_path / "serve-cpu.json"
    report = bench_serve.main(["--quick", "--out", str(out), *extra])
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
    assert grpc_res["finish_reasons"] == ["length"] and grpc_res["tokens_per_message"] >= 1
    assert sum(grpc_res["per_worker"].values()) == args["requests"]
    assert saved["ratio_tok_per_s"] > 0
    for key in ("device", "date", "commit", "command", "versions", "model", "worker_flags"):
        assert key in saved
    assert saved["device"] == report["device"] == "cpu"
    assert ("--random-weights" in saved["worker_flags"]) == bool(extra)
    table = out.with_suffix(".md").read_text()
    assert "| in-process engine |" in table and "Ratio gRPC / in-process" in table


def test_geometry_adapter_shapes():
    """llama3-8b: every layer's 7 projections at their shapes, 84 MB a rank-16 adapter (issue 9)."""
    template = {f"base_model.model.model.layers.{layer}.{part}.{name}.lora_{ab}.weight": (1, 1)
                for layer in (0, 1) for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                                        ("mlp", ("gate_proj", "up_proj", "down_proj")))
                for name in names for ab in "AB"}
    shapes = geometry_shapes(template, "llama3-8b", 16)
    assert len(shapes) == 32 * 14
    assert shapes["base_model.model.model.layers.31.self_attn.k_proj.lora_B.weight"] == (1024, 16)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (16, 14336)
    assert 2 * sum(a * b for a, b in shapes.values()) == adapter_bytes("llama3-8b", 16) == 83_886_080
    with pytest.raises(ValueError, match="lacks"):
        geometry_shapes({k: v for k, v in template.items() if "q_proj" not in k}, "llama3-8b", 16)


def test_geometry_adapters_are_peft_dirs_of_its_shapes(tmp_path):
    from bench.engine_setup import make_model_dir
    model_dir = make_model_dir("tiny", tmp_path / "model")
    dirs = make_adapters(model_dir, tmp_path / "adapters", 2, 8, seed=0, geometry="tiny")
    tensors = []
    for d in dirs:
        assert json.loads((d / "adapter_config.json").read_text())["r"] == 8
        with safe_open(d / WEIGHTS_FILE, "pt") as f:
            tensors.append({k: f.get_tensor(k) for k in f.keys()})
            assert 2 * sum(t.numel() for t in tensors[-1].values()) == adapter_bytes("tiny", 8)
    key = next(iter(tensors[0]))
    assert not tensors[0][key].equal(tensors[1][key])          # drawn afresh per adapter
