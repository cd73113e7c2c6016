"""bench/lora_mixed_step.py on CPU: it refuses to run without CUDA, and its table reads a report."""
from __future__ import annotations

import importlib

import pytest
import torch


def _script():
    # imported in the test, not at collection: it imports the Triton launchers, which must be
    # decorated after tests/kernels/conftest.py asks for the interpreter (TRITON_INTERPRET)
    return importlib.import_module("bench.lora_mixed_step")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_needs_cuda():
    with pytest.raises(SystemExit, match="CUDA"):
        _script().main([])


def test_table_has_a_row_per_case():
    case = {"rank": 16, "ranks": [16], "one_gpu_us": 289.3, "one_host_us": 561.1, "split_gpu_us": 270.7,
            "split_host_us": 1101.6, "base_gpu_us": 996.7}
    text = _script().table({"device": "H200", "date": "d", "commit": "c", "command": "cmd",
                            "cases": {"S100": case, "S1000": {**case, "rank": 64}}})
    assert "| S100 | 16 | 289.3 | 561.1 | 270.7 | 1101.6 | 996.7 |" in text
    assert "| S1000 | 64 |" in text
