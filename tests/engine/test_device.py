"""The engine's threads work on the engine's GPU (cuda:N), not on CUDA's per-thread default 0."""
from __future__ import annotations

import threading

import torch

from inference_worker import device as device_mod
from inference_worker.lora import slot_pool as slot_pool_mod
from tests.engine.test_slot_pool import adapter, make_pool


def test_use_device_sets_the_thread_s_cuda_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    device_mod.use_device(torch.device("cpu"))
    assert calls == []
    device_mod.use_device(torch.device("cuda:1"))
    assert calls == [torch.device("cuda:1")]


def test_an_unindexed_cuda_device_is_the_current_one(monkeypatch):
    """torch refuses set_device("cuda"); the engine resolves it once, in the thread that builds it."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert device_mod.resolve(torch.device("cuda")) == torch.device("cuda:3")
    assert device_mod.resolve(torch.device("cuda:1")) == torch.device("cuda:1")
    assert device_mod.resolve(torch.device("cpu")) == torch.device("cpu")
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    device_mod.use_device(torch.device("cuda"))
    assert calls == [torch.device("cuda:3")]


def test_the_adapter_loader_thread_starts_on_the_pool_s_device(monkeypatch):
    threads = []
    monkeypatch.setattr(slot_pool_mod, "use_device", lambda d: threads.append((threading.current_thread().name, d)))
    pool, _ = make_pool(load_thread=True)
    try:
        pool.acquire("x", lambda: adapter("x", rank=4))
        pool.settle()                                   # the load ran on the loader thread
        assert [(name.startswith("slot-loader"), d) for name, d in threads] == [(True, torch.device("cpu"))]
    finally:
        pool.close()


def test_the_engine_loop_uses_the_engine_s_device(monkeypatch):
    from inference_worker import engine as engine_mod

    seen = []
    monkeypatch.setattr(engine_mod, "use_device", lambda d: seen.append((threading.current_thread().name, d)))
    engine = engine_mod.LLMEngine.__new__(engine_mod.LLMEngine)
    engine.device = torch.device("cpu")
    engine._stopping = True                              # the loop returns at once
    engine._cond = threading.Condition()
    engine._loop()
    assert seen == [(threading.current_thread().name, torch.device("cpu"))]
