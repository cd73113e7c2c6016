"""Ensemble merging: several adapters -> one, with PEFT add_weighted_adapter semantics.

A recipe (interfaces.MergeRecipe) names adapters, weights and a strategy with the
meaning PEFT gives the same `combination_type`, so users can reproduce a merge
offline with `PeftModel.add_weighted_adapter`. The worker validates the recipe,
keys its cache by `merge_key` (resolved versions included), and builds the
adapter once with `merge_adapters` on its device.

Three families (per (layer, module); s_i = part i's scaling, w_i its weight):
- factor-wise (linear, ties, dare_*, magnitude_prune): merge A's and B's separately,
  A with sign(w_i s_i)·sqrt|w_i s_i|, B with sqrt|w_i s_i|. Needs equal ranks.
- cat: A = [w_i s_i A_i] stacked on rows, B = [B_i] on columns; ranks add.
- *_svd: delta W_i = s_i B_i A_i merged elementwise, then truncated SVD to
  svd_rank (0: the max input rank): B = U_r diag(S_r), A = Vh_r.
The merged adapter's scaling is 1.0 (PEFT gives it r = lora_alpha = new rank), so
its delta is B @ A. Modules some parts lack are skipped for those parts, as PEFT
does (the same as a zero contribution, and no DARE mask drawn for them).
One known difference: when the FIRST adapter is rsLoRA, PEFT's merged config
inherits use_rslora and scales by sqrt(new rank) instead of 1; AdapterWeights does
not record use_rslora, so we keep 1.0 (the factors themselves are PEFT's).
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers

import torch

from inference_worker.adapter_weights import AdapterWeights, ModuleKey
from inference_worker.interfaces import MergeRecipe
from inference_worker.merge_strategies import FACTOR_METHODS, combine
from services.adapter_format import TARGET_MODULES
from services.errors import FailedPrecondition, InvalidArgument

STRATEGIES = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
              "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")  # PEFT's combination_type names
SVD_STRATEGIES = tuple(s for s in STRATEGIES if s.endswith("svd"))
DENSITY_STRATEGIES = tuple(s for s in STRATEGIES if s.startswith(("ties", "dare", "magnitude_prune")))
SIGN_STRATEGIES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
SEED_STRATEGIES = tuple(s for s in STRATEGIES if s.startswith("dare"))
EQUAL_RANK_STRATEGIES = FACTOR_METHODS
SIGN_METHODS = ("total", "frequency")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_recipe(recipe: MergeRecipe) -> None:
    """Raise InvalidArgument (message says what) unless the recipe is well formed."""
    if not recipe.adapters:
        raise InvalidArgument("merge: no adapters given")
    if any(not isinstance(a, str) or not a for a in recipe.adapters):
        raise InvalidArgument("merge: adapter names must be non-empty strings")
    if not recipe.weights:
        raise InvalidArgument("merge: weights missing (one per adapter)")
    if len(recipe.weights) != len(recipe.adapters):
        raise InvalidArgument(f"merge: {len(recipe.weights)} weights for {len(recipe.adapters)} adapters")
    if not all(_is_real(w) and math.isfinite(w) for w in recipe.weights):
        raise InvalidArgument(f"merge: weights must be finite numbers, got {list(recipe.weights)}")
    if recipe.strategy not in STRATEGIES:
        raise InvalidArgument(f"merge: unknown strategy {recipe.strategy!r}; one of {', '.join(STRATEGIES)}")
    if recipe.strategy in DENSITY_STRATEGIES:
        if recipe.density is None:
            raise InvalidArgument(f"merge: strategy {recipe.strategy} needs a density in (0, 1]")
        if not (_is_real(recipe.density) and 0 < recipe.density <= 1):
            raise InvalidArgument(f"merge: density must be in (0, 1], got {recipe.density!r}")
    if recipe.majority_sign_method not in SIGN_METHODS:
        raise InvalidArgument(f"merge: majority_sign_method must be total or frequency, "
                              f"got {recipe.majority_sign_method!r}")
    if not (_is_int(recipe.seed) and 0 <= recipe.seed < 2**64):
        raise InvalidArgument(f"merge: seed must be an integer in [0, 2^64), got {recipe.seed!r}")
    if not (_is_int(recipe.svd_rank) and recipe.svd_rank >= 0):
        raise InvalidArgument(f"merge: svd_rank must be an integer >= 0 (0 = max input rank), "
                              f"got {recipe.svd_rank!r}")


def merge_key(resolved_keys: list[str], recipe: MergeRecipe) -> str:
    """"merge:<sha256[:16]>" of the canonical recipe with resolved "name@version" keys.

    Order matters (DARE's masks and float sums follow it). Fields the strategy does
    not use (density of linear, seed of non-DARE, ...) are left out, so recipes
    that build the same weights share a cache entry. Floats are JSON'd by repr
    (exact round trip); ints are made floats so 1 and 1.0 key alike.
    """
    validate_recipe(recipe)
    if len(resolved_keys) != len(recipe.adapters):
        raise InvalidArgument(f"merge: {len(resolved_keys)} resolved keys "
                              f"for {len(recipe.adapters)} adapters")
    s = recipe.strategy
    canonical = {
        "v": 1,
        "adapters": list(resolved_keys),
        "weights": [float(w) + 0.0 for w in recipe.weights],  # + 0.0: -0.0 keys like 0.0
        "strategy": s,
        "density": float(recipe.density) if s in DENSITY_STRATEGIES else None,
        "majority_sign_method": recipe.majority_sign_method if s in SIGN_STRATEGIES else None,
        "seed": recipe.seed if s in SEED_STRATEGIES else None,
        "svd_rank": recipe.svd_rank if s in SVD_STRATEGIES else None,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "merge:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _common_base_model(parts: list[AdapterWeights]) -> str:
    named = {p.base_model for p in parts if p.base_model}
    if len(named) > 1:
        raise FailedPrecondition(f"merge: adapters made for different base models: {sorted(named)}")
    return named.pop() if named else ""


def _module_order(parts: list[AdapterWeights]) -> list[ModuleKey]:
    # PEFT walks the model's modules in registration order: layer by layer, and in
    # a layer q, k, v, o, gate, up, down (Llama, Mistral, Qwen2). DARE's masks are
    # drawn in this order, so the same seed gives PEFT's masks.
    keys = {k for p in parts for k in p.modules}
    return sorted(keys, key=lambda k: (k[0], TARGET_MODULES.index(k[1])))


def _merge_cat(present, new_rank: int):
    """present: [(A [r_i, in], B [out, r_i], w_i, s_i)] -> A [new_rank, in], B [out, new_rank].

    Rows/columns of parts lacking the module stay zero at the end, as in PEFT.
    """
    a_cat = torch.cat([a * w * s for a, _, w, s in present], dim=0)  # (A*w)*s: PEFT's rounding
    b_cat = torch.cat([b for _, b, _, _ in present], dim=1)
    a0, b0 = present[0][0], present[0][1]
    merged_a = a0.new_zeros(new_rank, a0.shape[1])
    merged_b = b0.new_zeros(b0.shape[0], new_rank)
    merged_a[: a_cat.shape[0]] = a_cat
    merged_b[:, : b_cat.shape[1]] = b_cat
    return merged_a, merged_b


def _merge_factors(present, method: str, recipe: MergeRecipe, generator):
    """Merge A's and B's separately; the weight w_i s_i is split sqrt-wise, sign on A."""
    weights_a, weights_b = [], []
    for _, _, w, s in present:
        ws = w * s
        weights_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        weights_b.append(math.sqrt(abs(ws)))
    device, dtype = present[0][0].device, present[0][0].dtype
    merged = []
    for which, weights in ((0, weights_a), (1, weights_b)):  # all A's first, then B's: PEFT's RNG order
        tensors = [p[which] for p in present]
        out = combine(tensors, torch.tensor(weights, dtype=torch.float32, device=device), method,
                      recipe.density, recipe.majority_sign_method, generator)
        merged.append(out.to(dtype))
    return merged[0], merged[1]


def _merge_svd(present, method: str, new_rank: int, recipe: MergeRecipe, generator):
    """delta W_i = s_i B_i A_i [out, in] (float32), merged, then truncated SVD."""
    deltas = [(b.float() @ a.float()) * s for a, b, _, s in present]
    weights = torch.tensor([w for _, _, w, _ in present], dtype=torch.float32, device=deltas[0].device)
    delta = combine(deltas, weights, method, recipe.density, recipe.majority_sign_method, generator)
    # Reduced SVD: same truncation as PEFT's full one without U [out, out], Vh [in, in].
    # A rank above min(out, in) adds nothing (delta's rank is at most that).
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(new_rank, sv.shape[0])
    dtype = present[0][0].dtype
    return vh[:rank].to(dtype), (u[:, :rank] @ torch.diag(sv[:rank])).to(dtype)


def merge_adapters(parts: list[AdapterWeights], recipe: MergeRecipe, key: str | None = None,
                   device=None) -> AdapterWeights:
    """The merged adapter (scaling 1.0: its delta per module is B @ A), built on `device`.

    parts[i] is recipe.adapters[i] resolved. Tensors are cast to parts[0]'s dtype.
    Raises InvalidArgument for a bad recipe or ranks the strategy cannot mix;
    FailedPrecondition for parts of different base models or module shapes.
    """
    validate_recipe(recipe)
    if len(parts) != len(recipe.adapters):
        raise InvalidArgument(f"merge: {len(parts)} adapters for a recipe of {len(recipe.adapters)}")
    base_model = _common_base_model(parts)
    # PEFT: "if there is only one adapter, we can only use linear merging".
    strategy = "linear" if len(parts) == 1 else recipe.strategy
    ranks = [p.rank for p in parts]
    if strategy in EQUAL_RANK_STRATEGIES and len(set(ranks)) > 1:
        raise InvalidArgument(f"merge: strategy {strategy} needs adapters of equal rank, got ranks {ranks}; "
                              f"use cat or an *_svd strategy")
    if strategy == "cat":
        new_rank = sum(ranks)
    elif strategy in SVD_STRATEGIES:
        new_rank = recipe.svd_rank or max(ranks)
    else:
        new_rank = ranks[0]
    if device is None:
        device = next((a.device for p in parts for a, _ in p.modules.values()), torch.device("cpu"))
    device = torch.device(device)
    dtype = next((a.dtype for p in parts for a, _ in p.modules.values()), torch.float32)
    generator = None
    if strategy in SEED_STRATEGIES:  # DARE: masks from the recipe's seed, never the global RNG
        generator = torch.Generator(device=device).manual_seed(recipe.seed)

    modules = {}
    for mkey in _module_order(parts):
        # (A [r_i, in], B [out, r_i], weight, scaling) of each part that has this module
        present = [(a.to(device, dtype), b.to(device, dtype), float(w), p.scaling)
                   for p, w in zip(parts, recipe.weights) if mkey in p.modules
                   for a, b in [p.modules[mkey]]]
        shapes = {(b.shape[0], a.shape[1]) for a, b, _, _ in present}
        if len(shapes) > 1:
            raise FailedPrecondition(f"merge: layer {mkey[0]} {mkey[1]} has different shapes [out, in] "
                                     f"across adapters {sorted(shapes)}: made for different base models")
        if strategy == "cat":
            modules[mkey] = _merge_cat(present, new_rank)
        elif strategy in SVD_STRATEGIES:
            method = "linear" if strategy == "svd" else strategy.removesuffix("_svd")
            modules[mkey] = _merge_svd(present, method, new_rank, recipe, generator)
        else:
            modules[mkey] = _merge_factors(present, strategy, recipe, generator)

    rank = max((a.shape[0] for a, _ in modules.values()), default=new_rank)
    key = key or merge_key([p.key for p in parts], recipe)
    return AdapterWeights(key, base_model, rank, 1.0, modules)
