"""bench/adapter_load.py on the CPU with the tiny geometry: loads land in the slot, report complete."""
from __future__ import annotations

import json

from bench import adapter_load


def test_adapter_load_bench_writes_report(tmp_path):
    out = tmp_path / "adapter-load-cpu.json"
    report = adapter_load.main(["--geometry", "tiny", "--loads", "3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert len(saved["loads"]) == 3 and saved["rank"] == 16 and not saved["pinned"]
    for phase in adapter_load.PHASES:
        assert saved[phase]["p50"] >= 0
    assert saved["total_ms"]["p50"] >= saved["read_ms"]["p50"]
    assert "| total |" in out.with_suffix(".md").read_text() and report["device"].startswith("cpu")


def test_loaded_adapter_is_in_the_slot(tmp_path):
    """What the bench times is a real load: the blob's A of layer 0 q_proj is in the slot after it."""
    from inference_worker.adapter_weights import load_adapter_blob

    path = tmp_path / "blob.safetensors"
    adapter_load.write_blob(path, "tiny", rank=8)
    pool = adapter_load.slot_pool("tiny", 8, adapter_load.torch.device("cpu"))
    adapter_load.one_load(pool, path, "k", pin=False, drop=False)
    qkv = pool._layers[0]                                    # layer 0's fused q/k/v
    a = load_adapter_blob(path, "k").modules[(0, "q_proj")][0]
    assert adapter_load.torch.equal(qkv.a_pool[pool.slot_of("k"), 0, :8], a)
