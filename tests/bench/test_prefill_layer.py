"""bench/prefill_layer.py's statistics (CPU): a variant's cost is the median of per-rep differences,
so a drift that moves every variant alike cancels out, where separate medians would not."""
from __future__ import annotations

import importlib
import random
import subprocess
import sys

import pytest
import torch


def paired_costs(*args):
    # imported in the test, not at collection: bench.kernels imports the Triton launchers, which must
    # be decorated after tests/kernels/conftest.py asks for the interpreter (TRITON_INTERPRET)
    return importlib.import_module("bench.kernels").paired_costs(*args)


def test_paired_costs_cancel_a_drift():
    rng = random.Random(0)
    times = []
    for rep in range(101):
        base = 1100.0 + 3.0 * rep + rng.uniform(-5, 5)        # the GPU slows by 300 µs over the reps
        times.append([base, base + 100.0 + rng.uniform(-2, 2), base + 40.0, 1000.0 + 3.0 * rep])
    res = paired_costs(["base", "lora", "other", "matmuls"], times, ["lora", "other"])
    assert res["reps"] == 101 and set(res["lora_us"]) == {"lora", "other"}
    assert abs(res["lora_us"]["lora"] - 100.0) < 2.0 and abs(res["lora_us"]["other"] - 40.0) < 1e-9
    lo, hi = res["lora_spread_us"]["lora"]
    assert 98.0 <= lo <= res["lora_us"]["lora"] <= hi <= 102.0
    assert abs(res["median_us"]["base"] - 1250.0) < 10.0          # the plain medians: the drift's middle
    # one rep's outlier (a preempted replay) does not move the median
    times[50][1] += 5000.0
    assert abs(paired_costs(["base", "lora", "other", "matmuls"], times, ["lora"])["lora_us"]["lora"] - 100.0) < 2.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("cmd", [["bench/prefill_layer.py", "--reps", "1"], ["bench/early_weights.py"]])
def test_needs_cuda(cmd):
    """The GPU benches (also bench/early_weights.py) say so on a machine without CUDA."""
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs CUDA" in proc.stderr
