"""inference_worker/lora/layers.run_beside on CPU, with recording stand-ins for the CUDA stream calls:
the side stream waits for the current one before its work, and the current stream waits for the side
before anything after (the CUDA-graph tests on the GPU check the outputs)."""
from __future__ import annotations

import contextlib

import torch

from inference_worker.lora.layers import run_beside


class FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.device = name, log, torch.device("cuda", 1)

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(f"{self.name} waits {other.name}")


def test_side_work_is_fenced_on_both_ends(monkeypatch):
    log: list[str] = []
    main, side = FakeStream("main", log), FakeStream("side", log)
    current = [main]

    def current_stream(device=None):
        assert device == side.device                     # the side stream's device, not the default one
        return current[0]

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", on)
    out = run_beside(side, lambda: log.append(f"shrink on {current[-1].name}") or "y",
                     lambda: log.append(f"matmul on {current[-1].name}") or "out")
    assert out == ("out", "y")
    assert log == ["side waits main", "shrink on side", "matmul on main", "main waits side"]
