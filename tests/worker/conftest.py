"""Worker fixtures: one real store (in-process, SQLite) with real PEFT adapters pushed to it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import make_model
from tests.store.harness import StoreHarness

OTHER_BASE = "someone/other-model"


@dataclass(frozen=True)
class Pushed:
    name: str
    peft_dir: Path | None             # None: not servable here (other base / shapes)


# name -> adapter_factory kwargs: different ranks and target-module subsets (and one rsLoRA)
ADAPTERS = {
    "qv-r4": {"rank": 4, "target_modules": ("q_proj", "v_proj"), "seed": 1},
    "all-r8": {"rank": 8, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"), "seed": 2},
    "kog-r16": {"rank": 16, "alpha": 8.0, "target_modules": ("k_proj", "o_proj", "gate_proj"), "seed": 3},
    "mlp-r2": {"rank": 2, "target_modules": ("up_proj", "down_proj"), "seed": 4, "use_rslora": True},
    "attn-r8": {"rank": 8, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"), "seed": 5},
    "qv-r8": {"rank": 8, "target_modules": ("q_proj", "v_proj"), "seed": 6},
}


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    data = tmp_path_factory.mktemp("store-data")
    harness = StoreHarness(data, f"sqlite:///{data / 'index.sqlite'}").start()
    yield harness
    harness.stop()


@pytest.fixture(scope="session")
def pushed(store, tiny_model_dir, adapter_factory, tmp_path_factory):
    """name -> PEFT dir of every adapter in the store; plus "other-base" and "wrong-shape"."""
    out = {}
    for name, kwargs in ADAPTERS.items():
        peft_dir = adapter_factory(tiny_model_dir, **kwargs)
        store.client.upload(peft_dir, name)          # base model: PEFT's path of the tiny model
        out[name] = peft_dir
    other = adapter_factory(tiny_model_dir, rank=4, seed=7)
    store.client.upload(other, "other-base", base_model=OTHER_BASE)
    # same base model name, but made on a wider tiny model: only the shapes disagree
    wide = make_model(tmp_path_factory.mktemp("model-wide"), "llama", hidden_size=96, intermediate_size=160)
    store.client.upload(adapter_factory(wide, rank=4, seed=8), "wrong-shape", base_model=str(tiny_model_dir))
    return out


@pytest.fixture(scope="session")
def reference(tiny_model_dir, pushed):
    from tests.worker.harness import Reference
    return Reference(tiny_model_dir, pushed)


@pytest.fixture(scope="session")
def worker(tiny_model_dir, store, pushed, tmp_path_factory):
    """The shared worker: 4 adapter slots, defaults otherwise. Tests leave it idle."""
    from tests.worker.harness import WorkerHarness
    harness = WorkerHarness(tiny_model_dir, store.server.address, tmp_path_factory.mktemp("worker-data"),
                            max_adapter_slots=4)
    yield harness
    harness.stop()


@pytest.fixture
def make_worker(tiny_model_dir, store, pushed, tmp_path):
    """A private worker with engine overrides, and WorkerConfig ones in `worker` (stopped at the end
    of the test)."""
    from tests.worker.harness import WorkerHarness
    made = []

    def make(worker: dict | None = None, **engine_overrides):
        made.append(WorkerHarness(tiny_model_dir, store.server.address, tmp_path / f"w{len(made)}", worker,
                                  **engine_overrides))
        return made[-1]
    yield make
    for harness in made:
        harness.stop()
