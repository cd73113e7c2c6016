"""Which GPU a thread's CUDA calls go to."""
from __future__ import annotations

import torch


def resolve(device: torch.device) -> torch.device:
    """"cuda" without an index means the calling thread's current GPU: made explicit (cuda:N), so that
    other threads (which start on GPU 0) can be pointed at the same one. Other devices as they are."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def use_device(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (nothing for the CPU).

    CUDA's current device is per thread and starts at 0. Whatever asks for it implicitly
    (`torch.cuda.Stream()`, `current_stream()`, graph captures, events) in a worker serving
    cuda:1 would otherwise land on GPU 0. So the thread that builds the engine and every
    thread that issues work for it (the engine loop, the adapter loader) call this first.
    """
    if device.type == "cuda":
        torch.cuda.set_device(resolve(device))      # (torch 2.11 refuses an unindexed "cuda")
