"""The worker's startup freeze: later full collections skip what was alive at startup."""
from __future__ import annotations

import gc

from inference_worker.gc_freeze import freeze_startup_objects, unfreeze


def test_freeze_then_unfreeze():
    kept = [[i] for i in range(1000)]                 # tracked containers alive at "startup"
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= len(kept)
        assert not any(o is kept for o in gc.get_objects())   # out of every generation
    finally:
        unfreeze()
    assert gc.get_freeze_count() == 0
