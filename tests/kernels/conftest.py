"""Kernel tests run the Triton kernels interpreted on CPU (TRITON_INTERPRET=1) when no GPU is found.

The variable must be set before triton decorates the kernels, i.e. before any kernels.* launcher
module is imported; this conftest is loaded before the test modules of this folder.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
