"""router/routing_key.py: equal recipes route together, different ones need not."""
from __future__ import annotations

from protos import generate_pb2
from router.routing_key import routing_key
from services.generate_cli import build_request


def merged(parts, **kw) -> generate_pb2.GenerateRequest:
    return build_request("hi", merge=parts, **kw)


def test_adapter_and_base_model_keys():
    assert routing_key(build_request("hi", adapter="legal@2")) == "legal@2"
    assert routing_key(build_request("hi")) is None


def test_merge_key_is_stable_and_fills_defaults():
    a = merged([("legal", 0.7), ("finance", 0.3)], strategy="ties", density=0.5)
    b = merged([("legal", 0.7), ("finance", 0.3)], strategy="ties", density=0.5, majority_sign_method="total")
    assert routing_key(a) == routing_key(b)                              # "" and "total" mean the same
    assert routing_key(merged([("x", 1.0)], strategy="")) == routing_key(merged([("x", 1.0)], strategy="linear"))
    others = [merged([("legal", 0.6), ("finance", 0.4)], strategy="ties", density=0.5),
              merged([("legal", 0.7), ("finance", 0.3)], strategy="ties", density=0.6),
              merged([("legal", 0.7), ("finance", 0.3)], strategy="dare_ties", density=0.5),
              merged([("legal", 0.7), ("finance", 0.3)], strategy="ties", density=0.5, merge_seed=1)]
    keys = {routing_key(r) for r in [a, *others]}
    assert len(keys) == 5 and all(k.startswith("route-merge:") and "@" not in k for k in keys)
