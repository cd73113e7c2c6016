"""PEFT's add_weighted_adapter as the reference the merge tests compare against."""
from __future__ import annotations

import itertools
import re

import pytest
import torch

from inference_worker.interfaces import MergeRecipe

_MODULE_PATH = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
_counter = itertools.count()


def peft_merge(peft_model, recipe: MergeRecipe) -> tuple[str, dict, set[float]]:
    """Run PEFT's add_weighted_adapter for the recipe (adapters named as in ADAPTERS).

    Returns (new adapter name, {(layer, module): (A, B)}, {scaling of each module}).
    PEFT's inject_adapter draws the new adapter's init weights from torch's global
    RNG before merging; reseed right after it (at _freeze_adapter, called between
    the two) so DARE's masks come from the recipe's seed, as in merge_adapters.
    """
    import peft.tuners.lora.model as lora_model
    from peft.tuners.lora import LoraLayer

    freeze = lora_model._freeze_adapter

    def freeze_then_seed(*args, **kwargs):
        freeze(*args, **kwargs)
        torch.manual_seed(recipe.seed)

    name = f"merged{next(_counter)}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora_model, "_freeze_adapter", freeze_then_seed)
        peft_model.add_weighted_adapter(
            list(recipe.adapters), list(recipe.weights), name, combination_type=recipe.strategy,
            svd_rank=recipe.svd_rank or None, density=recipe.density,
            majority_sign_method=recipe.majority_sign_method)
    modules, scalings = {}, set()
    for path, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            layer, mod = _MODULE_PATH.search(path).groups()
            modules[(int(layer), mod)] = (module.lora_A[name].weight.detach().clone(),
                                          module.lora_B[name].weight.detach().clone())
            scalings.add(module.scaling[name])
    return name, modules, scalings
