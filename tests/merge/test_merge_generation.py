"""Generating with a merged adapter equals PEFT generating with its weighted adapter.

Reference, pure torch: our merged delta W = scaling * B @ A added into a copy of the
HF base model's weights. PEFT runs the LoRA path unmerged (W x + s B A x), so the two
differ only in float rounding; greedy tokens (float32, 8 of them) must agree.
"""
from __future__ import annotations

import pytest
import torch

from inference_worker.interfaces import MergeRecipe
from inference_worker.merge import merge_adapters
from tests.merge.peft_reference import peft_merge

PROMPT = [[1, 17, 42, 99, 256, 7, 311]]
RECIPES = [
    MergeRecipe(("a", "b"), (0.7, -0.4), "linear"),
    MergeRecipe(("a", "b", "c"), (0.7, -0.4, 1.2), "cat"),
    MergeRecipe(("a", "b"), (0.7, 0.3), "ties", density=0.5),
    MergeRecipe(("a", "b"), (0.7, 0.3), "dare_ties", density=0.6, seed=11),
    MergeRecipe(("a", "c"), (0.7, 0.5), "svd"),
]


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _greedy(model, **kwargs) -> list[int]:
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.strategy)
def test_greedy_tokens_equal_peft(parts, peft_model, base_model, recipe):
    merged = merge_adapters([parts[name] for name in recipe.adapters], recipe)
    original = {k: v.clone() for k, v in base_model.state_dict().items()}
    try:
        with torch.no_grad():
            for (layer, module), (a, b) in merged.modules.items():
                block = base_model.model.layers[layer]
                linear = getattr(block.self_attn if hasattr(block.self_attn, module) else block.mlp, module)
                linear.weight += merged.scaling * (b @ a)   # [out, r] @ [r, in] = [out, in]
        ours = _greedy(base_model)
    finally:
        base_model.load_state_dict(original)

    name, _, _ = peft_merge(peft_model, recipe)
    peft_model.set_adapter(name)
    assert _greedy(peft_model) == ours
    assert ours != _greedy(base_model), "the merged adapter should change the output"
