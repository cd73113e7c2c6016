"""Merge fixtures: real PEFT adapters on the tiny model, loaded both in PEFT and as AdapterWeights."""
from __future__ import annotations

import pytest
import torch

from inference_worker.adapter_weights import AdapterWeights, load_peft_dir

# Mixed scalings, ranks and target modules: a and b (equal rank) each target one
# module the other lacks; c has another rank; rs is rsLoRA (scaling alpha/sqrt(r)).
ADAPTERS = {
    "a": dict(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj", "down_proj"), seed=1),
    "b": dict(rank=8, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj"), seed=2),
    "c": dict(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj"), seed=3),
    "rs": dict(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"), seed=4, use_rslora=True),
}


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, adapter_factory):
    return {name: adapter_factory(tiny_model_dir, **kwargs) for name, kwargs in ADAPTERS.items()}


@pytest.fixture(scope="session")
def parts(adapter_dirs) -> dict[str, AdapterWeights]:
    """AdapterWeights keyed by PEFT adapter name; their keys are "<name>@1"."""
    return {name: load_peft_dir(path, f"{name}@1") for name, path in adapter_dirs.items()}


@pytest.fixture(scope="session")
def peft_model(tiny_model_dir, adapter_dirs):
    """The tiny model (float32) with every adapter of ADAPTERS loaded under its name."""
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    return model.eval()
