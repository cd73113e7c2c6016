"""Every strategy's merged weights equal PEFT's add_weighted_adapter on the same adapters.

Factor-wise strategies and cat are compared bit for bit (A and B per module, DARE
included: same seed, same masks). The *_svd strategies are compared on the delta W
per module, within float tolerance (we take a reduced SVD where PEFT takes a full one).
"""
from __future__ import annotations

import pytest
import torch

from inference_worker.interfaces import MergeRecipe
from inference_worker.merge import merge_adapters
from services.errors import InvalidArgument
from tests.merge.peft_reference import peft_merge

EXACT = [
    MergeRecipe(("a", "b"), (0.7, -0.4), "linear"),
    MergeRecipe(("a", "rs"), (0.5, 0.5), "linear"),               # an rsLoRA input: alpha/sqrt(r) scaling
    MergeRecipe(("a", "b", "c"), (0.7, -0.4, 1.2), "cat"),        # unequal ranks: ranks add
    MergeRecipe(("a", "b"), (0.7, 0.3), "ties", density=0.5),
    MergeRecipe(("a", "b"), (0.6, -0.9), "ties", density=0.3, majority_sign_method="frequency"),
    MergeRecipe(("a", "b"), (0.7, 0.3), "dare_linear", density=0.6, seed=7),
    MergeRecipe(("a", "b", "rs"), (0.7, 0.3, 0.2), "dare_ties", density=0.6, seed=11),
    MergeRecipe(("a", "b"), (1.0, 1.0), "dare_ties", density=0.4, majority_sign_method="frequency", seed=3),
    MergeRecipe(("a", "b"), (0.7, 0.3), "magnitude_prune", density=0.3),
    MergeRecipe(("a", "b"), (0.7, 0.3), "ties", density=1.0),     # density 1: no pruning
    MergeRecipe(("c",), (0.8,), "ties", density=0.5),             # one adapter: PEFT merges linearly
]

SVD = [
    MergeRecipe(("a", "b", "c"), (0.7, -0.4, 1.2), "svd"),
    MergeRecipe(("a", "c"), (0.7, 0.5), "svd", svd_rank=12),      # above the max input rank
    MergeRecipe(("a", "c"), (0.7, 0.5), "ties_svd", density=0.5, svd_rank=6),
    MergeRecipe(("a", "c"), (0.7, 0.5), "dare_linear_svd", density=0.5, seed=5),
    MergeRecipe(("b", "c"), (0.7, 0.5), "dare_ties_svd", density=0.7, majority_sign_method="frequency",
                seed=9),
    MergeRecipe(("a", "c"), (0.7, 0.5), "magnitude_prune_svd", density=0.4),
]


def _ours(parts, recipe):
    return merge_adapters([parts[name] for name in recipe.adapters], recipe)


def _id(recipe: MergeRecipe) -> str:
    return f"{recipe.strategy}-{'+'.join(recipe.adapters)}"


def _ours_and_peft(parts, peft_model, recipe):
    """Our merged adapter and PEFT's modules: same scaling (1.0) and the same module keys."""
    merged = _ours(parts, recipe)
    _, peft_modules, peft_scalings = peft_merge(peft_model, recipe)
    assert peft_scalings == {merged.scaling} == {1.0}
    assert set(merged.modules) == set(peft_modules)
    return merged, peft_modules


@pytest.mark.parametrize("recipe", EXACT, ids=_id)
def test_factorwise_and_cat_equal_peft_exactly(parts, peft_model, recipe):
    merged, peft_modules = _ours_and_peft(parts, peft_model, recipe)
    for mkey, (peft_a, peft_b) in peft_modules.items():
        a, b = merged.modules[mkey]
        assert torch.equal(a, peft_a), f"A of {mkey}"
        assert torch.equal(b, peft_b), f"B of {mkey}"
    assert merged.rank == next(iter(peft_modules.values()))[0].shape[0]


@pytest.mark.parametrize("recipe", SVD, ids=_id)
def test_svd_strategies_equal_peft_delta(parts, peft_model, recipe):
    merged, peft_modules = _ours_and_peft(parts, peft_model, recipe)
    for mkey, (peft_a, peft_b) in peft_modules.items():
        a, b = merged.modules[mkey]
        assert a.shape == peft_a.shape and b.shape == peft_b.shape
        torch.testing.assert_close(b @ a, peft_b @ peft_a, rtol=1e-4, atol=1e-5, msg=f"delta W of {mkey}")


def test_unequal_ranks_refused_like_peft(parts, peft_model):
    for strategy in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        recipe = MergeRecipe(("a", "c"), (0.5, 0.5), strategy, density=0.5)
        with pytest.raises(InvalidArgument, match="equal rank"):
            _ours(parts, recipe)
        with pytest.raises(ValueError, match="same r value"):
            peft_merge(peft_model, recipe)


def test_rslora_first_adapter_factors_equal_peft(parts, peft_model):
    """PEFT copies use_rslora from the first adapter into the merged config, so its
    merged adapter scales B @ A by sqrt(r) instead of 1 (r = lora_alpha = new rank).
    AdapterWeights does not record use_rslora; our merged delta is B @ A. The factors agree."""
    recipe = MergeRecipe(("rs", "a"), (0.5, 0.5), "linear")
    merged = _ours(parts, recipe)
    _, peft_modules, _ = peft_merge(peft_model, recipe)
    for mkey, (peft_a, peft_b) in peft_modules.items():
        assert torch.equal(merged.modules[mkey][0], peft_a) and torch.equal(merged.modules[mkey][1], peft_b)
