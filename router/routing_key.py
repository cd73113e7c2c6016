"""The key a request is routed by: its adapter ref, a merge recipe's hash, or None (base model).

A merged adapter is built once per worker and cached under its recipe, so every
request with the same recipe should land where that merge already lives. The
worker's own cache key includes resolved adapter versions, which the router does
not know; routing only needs a key that is stable for equal recipes, so it hashes
the recipe exactly as the request states it (refs as given, defaults filled in).
"""
from __future__ import annotations

import hashlib
import json

from protos import generate_pb2

MERGE_PREFIX = "route-merge:"


def merge_key(merge: generate_pb2.MergeSpec) -> str:
    recipe = {
        "adapters": [[a.adapter, a.weight if a.HasField("weight") else None] for a in merge.adapters],
        "strategy": merge.merge_strategy or "linear",
        "density": merge.density if merge.HasField("density") else None,
        "majority_sign_method": merge.majority_sign_method or "total",
        "seed": merge.seed,
        "svd_rank": merge.svd_rank,
    }
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return MERGE_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def routing_key(request: generate_pb2.GenerateRequest) -> str | None:
    if len(request.merge.adapters):
        return merge_key(request.merge)
    return request.adapter or None
