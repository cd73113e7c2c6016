"""Tensor-level merge operations with the semantics of PEFT's merge_utils, in its order.

The float operations run in PEFT's order so results are bitwise equal to it. The
one change: DARE's random masks draw from an explicit torch.Generator instead of
torch's global RNG, so a recipe's seed reproduces its merge without touching
anyone else's randomness (same stream as torch.manual_seed(seed) on the same
device type). PEFT is a dev dependency only, so the worker has its own implementation.

Every function takes n task tensors of one shape (the same factor or delta W of
one module in each adapter) and weights [n], and returns one tensor of that shape.
"""
from __future__ import annotations

import torch

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    # Keep the int(density * numel) largest |values|; PEFT skips pruning at density >= 1.
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top_k = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    # DARE: keep each value with probability density, rescale by 1/density so the
    # expectation is unchanged. At density >= 1 no mask is drawn (no RNG consumed), as in PEFT.
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # stacked [n, *shape] * weights [n, 1, ...]
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    # Elect a sign per element from the (unweighted) pruned tensors; ties go to +.
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def _disjoint_merge(weighted: torch.Tensor, sign_mask: torch.Tensor) -> torch.Tensor:
    # Mean over the tensors that agree with the elected sign (not over all n).
    return (weighted * sign_mask).sum(dim=0) / torch.clamp(sign_mask.sum(dim=0), min=1.0)


def combine(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None,
            majority_sign_method: str, generator: torch.Generator | None) -> torch.Tensor:
    """Merge tensors [n x shape] with weights [n] by one of FACTOR_METHODS.

    linear:          sum_i w_i t_i
    magnitude_prune: sum_i w_i topk_density(t_i)
    dare_linear:     sum_i w_i bernoulli_density(t_i) / density
    ties / dare_ties: prune (magnitude / random) -> elect sign -> mean of w_i t_i that agree
    """
    if method in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, density, generator) for t in tensors]
    elif method != "linear":
        raise ValueError(f"unknown merge method {method!r}")
    stacked = torch.stack(tensors, dim=0)
    if method in ("ties", "dare_ties"):
        sign_mask = _majority_sign_mask(stacked, majority_sign_method)
        return _disjoint_merge(_weighted(stacked, weights), sign_mask)
    return _weighted(stacked, weights).sum(dim=0)
