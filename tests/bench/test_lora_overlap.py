"""bench/lora_overlap.py on CPU: its table and its refusal without CUDA."""
from __future__ import annotations

import importlib

import pytest
import torch


def _script():
    # imported in the test, not at collection: it imports the Triton launchers, which must be
    # decorated after tests/kernels/conftest.py asks for the interpreter (TRITON_INTERPRET)
    return importlib.import_module("bench.lora_overlap")


def test_table_has_every_mode():
    row = {"case": "S100", "tokens": 64, "adapters": 48, "base_us": 100.0, "lora_floor_us": 30.0}
    for mode, total in zip(("none", "shrink"), (180.0, 160.0)):
        row[f"{mode}_us"], row[f"{mode}_lora_us"] = total, total - 100.0
    text = _script().table([row])
    assert "| S100 | 64 | 48 | 100.0 | 30.0 | 180.0 (80.0) | 160.0 (60.0) |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_needs_cuda():
    with pytest.raises(SystemExit, match="CUDA"):
        _script().main([])
