"""Recipe validation, cache keys, DARE seeding, and the errors merge_adapters raises."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from inference_worker.adapter_weights import AdapterWeights
from inference_worker.interfaces import MergeRecipe
from inference_worker.merge import STRATEGIES, merge_adapters, merge_key, validate_recipe
from services.errors import FailedPrecondition, InvalidArgument

GOOD = MergeRecipe(("legal", "finance"), (0.7, 0.3), "ties", density=0.5)


@pytest.mark.parametrize("changes, message", [
    (dict(adapters=(), weights=()), "no adapters"),
    (dict(adapters=("legal", "")), "non-empty"),
    (dict(weights=()), "weights missing"),
    (dict(weights=(1.0,)), "1 weights for 2 adapters"),
    (dict(weights=(0.5, float("nan"))), "finite"),
    (dict(weights=(0.5, float("inf"))), "finite"),
    (dict(weights=(0.5, "1")), "finite"),
    (dict(weights=(0.5, True)), "finite"),
    (dict(strategy="average"), "unknown strategy"),
    (dict(strategy=""), "unknown strategy"),
    (dict(density=None), "needs a density"),
    (dict(density=0.0), r"density must be in \(0, 1\]"),
    (dict(density=-0.1), r"density must be in \(0, 1\]"),
    (dict(density=1.5), r"density must be in \(0, 1\]"),
    (dict(density=float("nan")), r"density must be in \(0, 1\]"),
    (dict(strategy="dare_linear_svd", density=None), "needs a density"),
    (dict(strategy="magnitude_prune", density=None), "needs a density"),
    (dict(majority_sign_method="max"), "total or frequency"),
    (dict(majority_sign_method=""), "total or frequency"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(strategy="svd", svd_rank=-1), "svd_rank"),
    (dict(strategy="svd", svd_rank=2.5), "svd_rank"),
])
def test_bad_recipes_are_invalid_argument(changes, message):
    with pytest.raises(InvalidArgument, match=message):
        validate_recipe(dataclasses.replace(GOOD, **changes))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_good_recipes_pass(strategy):
    validate_recipe(dataclasses.replace(GOOD, strategy=strategy, density=1.0, svd_rank=4))
    if strategy in ("linear", "cat", "svd"):  # density not needed where it is not used
        validate_recipe(dataclasses.replace(GOOD, strategy=strategy, density=None))


KEYS = ["legal@3", "finance@1"]


def test_merge_key_is_stable():
    key = merge_key(KEYS, GOOD)
    assert re.fullmatch(r"merge:[0-9a-f]{16}", key)
    assert key == merge_key(list(KEYS), dataclasses.replace(GOOD))
    # Pinned: a change here silently invalidates every cached merged adapter and
    # spreads one recipe over two cache keys in a mixed-version fleet.
    assert key == "merge:95cc9755847e4c2a"


@pytest.mark.parametrize("keys, changes", [
    (["legal@4", "finance@1"], {}),                              # another resolved version
    (["finance@1", "legal@3"], {}),                              # order matters (masks, sums)
    (KEYS, dict(weights=(0.7, 0.30000000000000004))),            # floats keyed exactly
    (KEYS, dict(strategy="dare_ties")),
    (KEYS, dict(density=0.25)),
    (KEYS, dict(majority_sign_method="frequency")),
])
def test_merge_key_is_sensitive(keys, changes):
    assert merge_key(keys, dataclasses.replace(GOOD, **changes)) != merge_key(KEYS, GOOD)


def test_merge_key_sensitive_to_seed_and_svd_rank_where_used():
    dare = dataclasses.replace(GOOD, strategy="dare_linear")
    assert merge_key(KEYS, dare) != merge_key(KEYS, dataclasses.replace(dare, seed=1))
    svd = dataclasses.replace(GOOD, strategy="ties_svd")
    assert merge_key(KEYS, svd) != merge_key(KEYS, dataclasses.replace(svd, svd_rank=4))


def test_merge_key_ignores_what_the_strategy_does_not_use():
    linear = MergeRecipe(("legal", "finance"), (1, 0.5), "linear")
    same = [dataclasses.replace(linear, weights=(1.0, 0.5)), dataclasses.replace(linear, density=0.3),
            dataclasses.replace(linear, seed=9), dataclasses.replace(linear, svd_rank=4),
            dataclasses.replace(linear, majority_sign_method="frequency")]
    assert {merge_key(KEYS, r) for r in same} == {merge_key(KEYS, linear)}


def test_merge_key_checks_its_inputs():
    with pytest.raises(InvalidArgument, match="resolved keys"):
        merge_key(["legal@3"], GOOD)
    with pytest.raises(InvalidArgument, match="unknown strategy"):
        merge_key(KEYS, dataclasses.replace(GOOD, strategy="nope"))


def test_merged_adapter_key(parts):
    recipe = MergeRecipe(("a", "b"), (0.5, 0.5), "linear")
    ab = [parts["a"], parts["b"]]
    assert merge_adapters(ab, recipe).key == merge_key(["a@1", "b@1"], recipe)
    assert merge_adapters(ab, recipe, key="merge:given").key == "merge:given"


def test_dare_is_seeded_by_the_recipe_only(parts):
    ab = [parts["a"], parts["b"]]
    recipe = MergeRecipe(("a", "b"), (0.7, 0.3), "dare_ties", density=0.5, seed=1)
    rng_before = torch.random.get_rng_state()
    first = merge_adapters(ab, recipe)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG must stay untouched"
    torch.manual_seed(12345)
    again = merge_adapters(ab, recipe)
    other = merge_adapters(ab, dataclasses.replace(recipe, seed=2))
    mkey = (0, "q_proj")
    assert torch.equal(first.modules[mkey][0], again.modules[mkey][0])
    assert not torch.equal(first.modules[mkey][0], other.modules[mkey][0])


def test_result_dtype_device_and_rank(parts):
    half = [parts["a"].to(dtype=torch.bfloat16), parts["c"].to(dtype=torch.bfloat16)]
    cat = merge_adapters(half, MergeRecipe(("a", "c"), (0.5, 0.5), "cat"), device="cpu")
    assert cat.rank == 12 and cat.scaling == 1.0
    for a, b in cat.modules.values():
        assert a.dtype == b.dtype == torch.bfloat16 and a.device.type == "cpu"
    svd = merge_adapters(half, MergeRecipe(("a", "c"), (0.5, 0.5), "svd", svd_rank=100))
    # a rank above min(out, in) is cut to it: k_proj/v_proj are [32, 64] in the tiny model
    assert svd.modules[(0, "k_proj")][0].shape == (32, 64) and svd.rank == 64


def test_different_base_models_fail_precondition(parts):
    recipe = MergeRecipe(("a", "b"), (0.5, 0.5), "linear")
    a = dataclasses.replace(parts["a"], base_model="llama-8b")
    with pytest.raises(FailedPrecondition, match="different base models"):
        merge_adapters([a, dataclasses.replace(parts["b"], base_model="qwen-7b")], recipe)
    unnamed = dataclasses.replace(parts["b"], base_model="")
    assert merge_adapters([a, unnamed], recipe).base_model == "llama-8b"


def test_module_shape_mismatch_fails_precondition(parts):
    alien = AdapterWeights("x@1", "", 8, 2.0, {(0, "q_proj"): (torch.zeros(8, 128), torch.zeros(128, 8))})
    with pytest.raises(FailedPrecondition, match="different shapes"):
        merge_adapters([parts["a"], alien], MergeRecipe(("a", "x"), (0.5, 0.5), "cat"))


def test_parts_must_match_the_recipe(parts):
    with pytest.raises(InvalidArgument, match="1 adapters for a recipe of 2"):
        merge_adapters([parts["a"]], MergeRecipe(("a", "b"), (0.5, 0.5), "linear"))
