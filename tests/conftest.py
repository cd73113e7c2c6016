"""Session fixtures shared by every test area."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import make_adapter, make_model

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The default tiny Llama model (float32 weights)."""
    return make_model(tmp_path_factory.mktemp("model-llama"), "llama")


@pytest.fixture(scope="session")
def model_of_family(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_model(tmp_path_factory.mktemp(f"model-{family}"), family)
        return cache[family]
    return get


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory):
    """make(model_dir, rank=..., target_modules=..., seed=...) -> PEFT dir (cached per args)."""
    cache = {}

    def make(model_dir, **kwargs):
        key = (str(model_dir), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = make_adapter(model_dir, tmp_path_factory.mktemp("adapter"), **kwargs)
        return cache[key]
    return make
