"""Compute kernels: Triton on CUDA, PyTorch references elsewhere.

`get_ops(device)` (kernels/backend.py) returns the set to use; every op has the
signature of its reference in kernels/reference.py.
"""
from __future__ import annotations

import importlib.metadata
import warnings

NAME_CLASH = ("Hugging Face's `kernels` package (version {version}) is installed beside OpenLoRA, whose Triton kernels "
              "are the top-level package `kernels` too: whichever comes first on sys.path shadows the other. "
              "transformers >= 5.25 imports it at start and then fails (No module named 'kernels.layer'). "
              "OpenLoRA pins transformers < 5.25; `pip uninstall kernels` if nothing else needs it.")


def warn_on_name_clash() -> bool:
    """Warns (and -> True) when a distribution named `kernels` (Hugging Face's, a dependency of
    transformers >= 5.25) is installed: a clear cause ahead of the ImportError that follows it."""
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    warnings.warn(NAME_CLASH.format(version=version), RuntimeWarning, stacklevel=2)
    return True


warn_on_name_clash()
