"""bench/step_profile.py on CPU: the union of kernel intervals, the per-kind summary and table,
and its refusal without CUDA."""
from __future__ import annotations

import pytest
import torch

from bench import step_profile


def test_busy_is_the_union_of_kernel_intervals():
    assert step_profile.busy_ms([]) == 0.0
    assert step_profile.busy_ms([(0, 1000), (500, 1500), (3000, 4000)]) == pytest.approx(2.5)
    assert step_profile.busy_ms([(0, 4000), (1000, 2000)]) == pytest.approx(4.0)


def row(heavy: bool, host: float, kernel: float) -> dict:
    return {"prompt_heavy": heavy, "prefill_tokens": 1792 if heavy else 0, "decodes": 48, "adapters": 40,
            "host_ms": host, "step_ms": host + 3, "kernel_ms": kernel, "busy_ms": kernel, "span_ms": host + 2,
            "kernels": 885, "host_phases_ms": {"forward": host - 5}, "by_kind_ms": {"gemm": 29.0, "lora expand": 7.0}}


def test_summary_and_table():
    rows = [row(True, h, 50.0) for h in (45.0, 60.0, 90.0)] + [row(False, 4.0, 10.0)]
    summary = {kind: step_profile.summarize_kind([r for r in rows if r["prompt_heavy"] == heavy])
               for kind, heavy in (("prompt-heavy", True), ("decode", False))}
    assert summary["prompt-heavy"]["host_ms"] == 60.0 and summary["prompt-heavy"]["steps"] == 3
    assert summary["decode"]["kernel_ms"] == 10.0
    text = step_profile.table({"device": "H200", "date": "d", "commit": "c", "command": "cmd",
                               "workloads": {"S100": summary}})
    assert "| S100 | 3 | prompt-heavy | 1792 | 48 | 60.0 | 63.0 | 50.0 | 50.0 | 62.0 | gemm 29.00, lora expand 7.00 |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_needs_cuda():
    with pytest.raises(SystemExit, match="CUDA"):
        step_profile.main([])
