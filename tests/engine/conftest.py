"""Fixtures of the engine tests: tiny models per family, adapters per model, an engine factory."""
from __future__ import annotations

import pytest
import torch

from inference_worker.config import EngineConfig
from inference_worker.engine import LLMEngine
from tests.engine.doubles import DirSource
from tests.helpers import make_model

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Four adapters: different ranks, target-module subsets, scalings (one rsLoRA).
ADAPTER_SPECS = {
    "a4": {"rank": 4, "alpha": 8.0, "target_modules": ("q_proj", "v_proj"), "seed": 1},
    "a8": {"rank": 8, "alpha": 16.0, "target_modules": ALL_MODULES, "seed": 2},
    "a16": {"rank": 16, "alpha": 8.0, "target_modules": ("o_proj", "down_proj"), "seed": 3, "use_rslora": True},
    "a32": {"rank": 32, "alpha": 32.0, "target_modules": ("gate_proj", "up_proj", "k_proj"), "seed": 4},
}


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine spinning
    OpenMP threads slow every op many times over; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def family_model(model_of_family, tmp_path_factory):
    """name -> model dir; names: llama, llama3 (Llama 3.1 rope scaling), mistral, qwen2."""
    cache = {}

    def get(name: str):
        if name not in cache:
            if name == "llama3":
                cache[name] = make_model(tmp_path_factory.mktemp("model-llama3"), "llama", rope_scaling_llama3=True)
            else:
                cache[name] = model_of_family(name)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def adapters_of(adapter_factory):
    """model dir -> {ref: PEFT dir} for ADAPTER_SPECS."""
    def get(model_dir):
        return {ref: adapter_factory(model_dir, **spec) for ref, spec in ADAPTER_SPECS.items()}
    return get


MODES = {
    "cpu-defaults": {},
    "overlap-only": {"overlap_outputs": True, "adapter_load_thread": False, "async_scheduling": False},
    "cuda-defaults": {"overlap_outputs": True, "adapter_load_thread": True, "async_scheduling": True},
}


@pytest.fixture(params=list(MODES))
def make_engine(request):
    """make(model_dir, source, **config) -> LLMEngine (float32, CPU); stopped at teardown.
    Every engine test runs in three modes: the CPU defaults (no background work); outputs
    overlapped with the next step's forward only; and the CUDA defaults, all background work on
    (also adapter copies from a loader thread, and each step scheduled before the previous one's
    tokens are read back)."""
    engines = []

    def make(model_dir, source=None, **overrides):
        config = EngineConfig(**{"device": "cpu", "dtype": "float32", **MODES[request.param], **overrides})
        engine = LLMEngine(config, str(model_dir), source or DirSource({}))
        engines.append(engine)
        return engine
    yield make
    for engine in engines:
        engine.stop()
