"""Keep the garbage collector's full passes short while serving.

A worker holds ~370k objects the collector tracks once the engine is built (torch,
transformers, the model's modules and tensors). A full collection walks all of them and
stops every thread meanwhile, the engine thread included: ~170 ms on the 2-core CPU
machine. Serving allocates and frees objects at a high rate (token lists, outputs,
messages), so full passes come back every few seconds. Frozen, the startup objects are
skipped by every later pass (they are still freed by reference counting when dropped).
"""
from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Once, after the engine is built and before serving: collect, then freeze what is left.
    (On the CPU machine, bench/engine.py --quick: a full pass 170 -> 0.07 ms.)"""
    gc.collect()
    gc.freeze()


def unfreeze() -> None:
    """When serving ends: frozen objects are otherwise never collected at interpreter exit
    (extension modules then report them as leaked)."""
    gc.unfreeze()
