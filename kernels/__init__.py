"""Compute kernels: Triton on CUDA, PyTorch references elsewhere.

`get_ops(device)` (kernels/backend.py) returns the set to use; every op has the
signature of its reference in kernels/reference.py.
"""
