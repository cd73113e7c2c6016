"""bench/lora_overlap.py on CPU: its table and its refusal without CUDA."""
from __future__ import annotations

import pytest
import torch

from bench import lora_overlap


def test_table_has_every_mode():
    row = {"case": "S100", "tokens": 64, "adapters": 48, "base_us": 100.0, "lora_floor_us": 30.0}
    for mode, total in zip(("none", "shrink"), (180.0, 160.0)):
        row[f"{mode}_us"], row[f"{mode}_lora_us"] = total, total - 100.0
    text = lora_overlap.table([row])
    assert "| S100 | 64 | 48 | 100.0 | 30.0 | 180.0 (80.0) | 160.0 (60.0) |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_needs_cuda():
    with pytest.raises(SystemExit, match="CUDA"):
        lora_overlap.main([])
