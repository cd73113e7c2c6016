"""The LoRA kernels' GPU-only variants (programmatic dependent launch, the fused decode kernel, gate/up's
LoRA in the activation, the tl.dot paths) compile for sm_90 on a machine without a GPU (bench/kernel_regs.py,
in its own process: the kernel tests run the kernels interpreted, and the interpreter cannot compile)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_regs.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "all ok" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    # with lora_silu_mul, the early-weights and the prefetch variants, and those of ranks past 16
    assert sum(line.startswith("OK") for line in run.stdout.splitlines()) == 60
