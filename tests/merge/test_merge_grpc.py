"""Issue 6 end to end: merged adapters through a real store and a real gRPC worker.

The worker (in-process, CPU, float32) fetches the adapters of tests/merge/conftest.py
from a real store, merges them, and serves the merged adapter in its batches. The
reference is PEFT's add_weighted_adapter on the same PEFT dirs, generating greedily.
Recipes go through the proto (weights and density are float32 there); the PEFT recipe
is decoded from the same proto by the test itself (peft_recipe), with the issue's defaults.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import grpc
import pytest
import torch

from inference_worker import merge as merge_module
from inference_worker.interfaces import MergeRecipe
from inference_worker.merge import STRATEGIES, merge_key
from inference_worker.protocol import recipe_from_proto
from protos import generate_pb2, router_pb2, router_pb2_grpc
from services.channels import insecure_channel
from services.generate_cli import build_request
from tests.merge.peft_reference import peft_merge
from tests.store.harness import ROOT, StoreHarness, free_port, wait_for
from tests.worker.harness import StreamReader, WorkerHarness, code_of, request, run_concurrently, tokens_of

pytestmark = pytest.mark.timeout(300)

OTHER_BASE = "someone/other-model"
PROMPT = [1, 17, 42, 99, 256, 7, 311]
MAX_TOKENS = 10


def spec(adapters, weights, strategy="", **fields) -> generate_pb2.MergeSpec:
    """A MergeSpec; weight None leaves that adapter's weight unset. Empty strategy = linear."""
    return generate_pb2.MergeSpec(
        adapters=[generate_pb2.MergeAdapter(adapter=a, weight=w) if w is not None
                  else generate_pb2.MergeAdapter(adapter=a) for a, w in zip(adapters, weights)],
        merge_strategy=strategy, **fields)


# One recipe per strategy: mixed ranks (a, b: 8; c: 4), module subsets and scalings; rs
# (rsLoRA) never first (PEFT would scale the merged adapter by sqrt(r): see merge.py).
# majority_sign_method left empty means "total" (the proto's default).
RECIPES = {
    "linear": spec(("a", "b"), (0.7, -0.4), "linear"),
    "cat": spec(("a", "b", "c"), (0.7, -0.4, 1.2), "cat"),
    "svd": spec(("a", "b", "c"), (0.7, -0.4, 1.2), "svd"),
    "ties": spec(("a", "b"), (0.7, 0.3), "ties", density=0.5),
    "ties_svd": spec(("a", "c"), (0.7, 0.5), "ties_svd", density=0.5, svd_rank=6),
    "dare_linear": spec(("a", "b"), (0.7, 0.3), "dare_linear", density=0.6, seed=7),
    "dare_ties": spec(("a", "b", "rs"), (0.7, 0.3, 0.2), "dare_ties", density=0.6, seed=11,
                      majority_sign_method="frequency"),
    "dare_linear_svd": spec(("a", "c"), (0.7, 0.5), "dare_linear_svd", density=0.5, seed=5),
    "dare_ties_svd": spec(("b", "c"), (0.7, 0.5), "dare_ties_svd", density=0.7, seed=9),
    "magnitude_prune": spec(("a", "b"), (0.7, 0.3), "magnitude_prune", density=0.3),
    "magnitude_prune_svd": spec(("a", "c"), (0.7, 0.5), "magnitude_prune_svd", density=0.4),
}
assert set(RECIPES) == set(STRATEGIES)


@pytest.fixture(scope="module")
def store(tmp_path_factory, adapter_dirs, tiny_model_dir, adapter_factory):
    """A real store holding a, b, c, rs (PEFT names = store names) and one adapter of another base."""
    data = tmp_path_factory.mktemp("merge-store")
    harness = StoreHarness(data, f"sqlite:///{data / 'index.sqlite'}").start()
    for name, path in adapter_dirs.items():
        harness.client.upload(path, name)
    other = adapter_factory(tiny_model_dir, rank=8, seed=21)
    harness.client.upload(other, "other-base", base_model=OTHER_BASE)
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def worker(tiny_model_dir, store, tmp_path_factory):
    # max_lora_rank 32: cat of a, b, c has rank 20
    harness = WorkerHarness(tiny_model_dir, store.server.address, tmp_path_factory.mktemp("merge-worker"),
                            max_adapter_slots=8, max_lora_rank=32)
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def peft_merged(peft_model):
    """strategy -> (name, {(layer, module): (A, B)}) of PEFT's weighted adapter for RECIPES[strategy]."""
    cache = {}

    def get(strategy: str):
        if strategy not in cache:
            cache[strategy] = peft_merge(peft_model, peft_recipe(RECIPES[strategy]))[:2]
        return cache[strategy]
    return get


@pytest.fixture(scope="module")
def peft_names(peft_merged):
    return lambda strategy: peft_merged(strategy)[0]


@torch.no_grad()
def peft_greedy(peft_model, prompt_ids, max_tokens: int, adapter: str = "") -> list[int]:
    """Greedy token by token (no EOS stop), as the worker does with ignore_eos."""
    ids = torch.tensor([prompt_ids])
    out = []
    for _ in range(max_tokens):
        if adapter:
            peft_model.set_adapter(adapter)
            logits = peft_model(input_ids=ids).logits
        else:
            with peft_model.disable_adapter():
                logits = peft_model(input_ids=ids).logits
        out.append(int(logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


def peft_recipe(m: generate_pb2.MergeSpec) -> MergeRecipe:
    """The recipe as the issue defines the proto's defaults, decoded here, not by the worker's
    protocol.py (so a wrong default there shows). Weights/density are the proto's float32 values."""
    return MergeRecipe(tuple(a.adapter for a in m.adapters), tuple(a.weight for a in m.adapters),
                       m.merge_strategy or "linear", m.density if m.HasField("density") else None,
                       m.majority_sign_method or "total", m.seed, m.svd_rank)


def expected_key(store, merge: generate_pb2.MergeSpec) -> str:
    recipe = peft_recipe(merge)
    return merge_key([f"{a.name}@{a.version}" for a in map(store.client.get, recipe.adapters)], recipe)


def merge_keys(keys) -> list[str]:
    return [k for k in keys if k.startswith("merge:")]


def test_the_worker_decodes_recipes_with_the_issues_defaults():
    # empty majority_sign_method -> "total", empty merge_strategy -> "linear"
    recipe = recipe_from_proto(spec(("a", "b"), (0.7, 0.3), "ties", density=0.5))
    assert recipe.majority_sign_method == "total"
    assert recipe_from_proto(spec(("a", "b"), (0.7, 0.3))).strategy == "linear"
    for merge in RECIPES.values():
        assert recipe_from_proto(merge) == peft_recipe(merge)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generation_equals_peft_weighted_adapter(worker, store, peft_model, peft_merged, strategy):
    name, peft_modules = peft_merged(strategy)
    got = tokens_of(worker.generate(ids=PROMPT, max_tokens=MAX_TOKENS, merge=RECIPES[strategy]))
    assert got == peft_greedy(peft_model, PROMPT, MAX_TOKENS, name)
    assert got != peft_greedy(peft_model, PROMPT, MAX_TOKENS), "the merged adapter should change the output"
    # and the adapter the worker built (and cached under the recipe's key) is PEFT's
    merged = worker.worker.manager.cpu.get(expected_key(store, RECIPES[strategy]))
    assert merged is not None and merged.scaling == 1.0
    assert set(merged.modules) == set(peft_modules)
    for mkey, (peft_a, peft_b) in peft_modules.items():
        a, b = merged.modules[mkey]
        if strategy.endswith("svd"):     # reduced vs full SVD: the delta W agrees, not the factors
            torch.testing.assert_close(b @ a, peft_b @ peft_a, rtol=1e-4, atol=1e-5, msg=f"delta W of {mkey}")
        else:
            assert torch.equal(a, peft_a) and torch.equal(b, peft_b), f"A, B of {mkey}"


def test_same_recipe_reuses_the_cached_merge(worker, store, peft_model, peft_names, monkeypatch):
    recipe = spec(("a", "b"), (0.6, 0.4), "ties", density=0.4)
    key = expected_key(store, recipe)
    assert key not in worker.status().cpu_adapters
    builds = []
    real_merge = merge_module.merge_adapters

    def counting(*args, **kwargs):
        builds.append(kwargs.get("key"))
        return real_merge(*args, **kwargs)
    monkeypatch.setattr(merge_module, "merge_adapters", counting)

    first = tokens_of(worker.generate(ids=PROMPT, max_tokens=MAX_TOKENS, merge=recipe))
    # the same recipe again, then spelt with versions and a seed and svd_rank that ties ignores:
    # one cache key, one build
    again = tokens_of(worker.generate(ids=PROMPT, max_tokens=MAX_TOKENS, merge=recipe))
    versioned = spec(("a@1", "b@1"), (0.6, 0.4), "ties", density=0.4, seed=123, svd_rank=4)
    assert expected_key(store, versioned) == key
    third = tokens_of(worker.generate(ids=PROMPT, max_tokens=MAX_TOKENS, merge=versioned))
    assert first == again == third
    assert builds == [key]
    status = worker.status()
    assert merge_keys(status.cpu_adapters).count(key) == 1
    assert merge_keys(status.gpu_adapters).count(key) == 1
    name = peft_merge(peft_model, peft_recipe(recipe))[0]
    assert first == peft_greedy(peft_model, PROMPT, MAX_TOKENS, name)


def test_batch_mixing_merged_single_and_base_stays_exact(worker, peft_model, peft_names):
    # (prompt, adapter or "", strategy or None): different prompts so each row is its own
    jobs = [
        ([1, 5, 9, 200, 31], "", "linear"),
        ([1, 77, 12, 3], "", "dare_ties"),
        ([1, 400, 401, 402, 403, 404], "", "cat"),
        ([1, 17, 42, 99], "", "svd"),
        ([1, 8, 8, 8], "a", None),
        ([1, 300, 2, 9, 11], "c", None),
        ([1, 250, 6], "b@1", None),
        ([1, 23, 45, 67, 89], "", None),
        ([1, 5, 9, 200, 31], "", None),
    ]
    max_tokens = 12
    want = [peft_greedy(peft_model, p, max_tokens, peft_names(s) if s else a.partition("@")[0])
            for p, a, s in jobs]
    calls = [lambda p=p, a=a, s=s: tokens_of(worker.generate(ids=p, max_tokens=max_tokens, adapter=a,
                                                             merge=RECIPES[s] if s else None))
             for p, a, s in jobs]
    got = run_concurrently(calls)
    assert got == want
    worker.wait_idle()


INVALID, FAILED, NOT_FOUND = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                               grpc.StatusCode.NOT_FOUND)
BAD = [
    ("weight missing", spec(("a", "b"), (0.5, None)), INVALID, "weight missing"),
    ("weight nan", spec(("a", "b"), (0.5, math.nan)), INVALID, "finite"),
    ("weight inf", spec(("a", "b"), (math.inf, 0.5)), INVALID, "finite"),
    ("density 0", spec(("a", "b"), (0.5, 0.5), "ties", density=0.0), INVALID, "density"),
    ("density 1.5", spec(("a", "b"), (0.5, 0.5), "dare_ties", density=1.5), INVALID, "density"),
    ("density nan", spec(("a", "b"), (0.5, 0.5), "ties", density=math.nan), INVALID, "density"),
    ("density missing", spec(("a", "b"), (0.5, 0.5), "magnitude_prune"), INVALID, "density"),
    ("unknown strategy", spec(("a", "b"), (0.5, 0.5), "average"), INVALID, "unknown strategy"),
    ("bad sign method", spec(("a", "b"), (0.5, 0.5), "ties", density=0.5, majority_sign_method="max"),
     INVALID, "total or frequency"),
    ("unequal ranks linear", spec(("a", "c"), (0.5, 0.5), "linear"), INVALID, "equal rank"),
    ("unequal ranks dare_ties", spec(("c", "b"), (0.5, 0.5), "dare_ties", density=0.5),
     INVALID, "equal rank"),
    ("another base model", spec(("a", "other-base"), (0.5, 0.5), "linear"), FAILED, ""),
    ("merged rank over the worker's limit", spec(("a", "b", "c", "rs", "b"), (0.2,) * 5, "cat"),
     FAILED, "rank"),
    ("unknown adapter", spec(("a", "no-such-adapter"), (0.5, 0.5), "cat"), NOT_FOUND, ""),
    ("unknown version", spec(("a@99", "b"), (0.5, 0.5), "cat"), NOT_FOUND, ""),
]


def test_bad_recipes_fail_alone_while_a_good_request_streams(worker, store, peft_model, peft_names):
    before = set(merge_keys(worker.status().cpu_adapters))
    max_tokens = 60
    good_request = request(ids=PROMPT, max_tokens=max_tokens, merge=RECIPES["ties"])
    call = worker.stub.Generate(good_request, timeout=120)
    good = StreamReader(call)
    first = good.next()                  # the good request is running when the bad ones arrive
    results = run_concurrently([lambda m=m: worker.generate(ids=PROMPT, merge=m) for _, m, _, _ in BAD])
    for (what, _, code, message), result in zip(BAD, results):
        assert code_of(result) == code, f"{what}: {result!r}"
        assert message in result.details(), f"{what}: {result.details()}"
    assert good.done.wait(120) and good.error is None
    rest = []
    while not good.items.empty():
        rest.append(good.items.get_nowait())
    assert tokens_of([first, *rest]) == peft_greedy(peft_model, PROMPT, max_tokens, peft_names("ties"))
    worker.wait_idle()
    # failed recipes leave nothing cached (only the good request's merge may be new); merging still works
    assert set(merge_keys(worker.status().cpu_adapters)) - before <= {expected_key(store, RECIPES["ties"])}
    assert tokens_of(worker.generate(ids=PROMPT, max_tokens=MAX_TOKENS, merge=RECIPES["linear"])) == \
        peft_greedy(peft_model, PROMPT, MAX_TOKENS, peft_names("linear"))


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _openlora(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def test_cli_merge_through_a_router_prints_the_worker_text(worker, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "router.log"
    with open(log_path, "wb") as log:
        router = subprocess.Popen(_openlora("router", "--listen", address, "--workers", worker.address),
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        with insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)

            def worker_healthy():
                if router.poll() is not None:
                    raise RuntimeError(f"router exited with {router.returncode}: {log_path.read_text()}")
                try:
                    reply = stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=2)
                except grpc.RpcError:
                    return False
                return any(w.healthy for w in reply.workers)
            wait_for(worker_healthy, "the router to see the worker", interval_s=0.1)

        prompt = "The quick brown fox"
        done = subprocess.run(_openlora("generate", prompt, "--merge", "a:0.7,b:0.3", "--strategy", "linear",
                                        "--router", address, "--max-tokens", "8", "--temperature", "0"),
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=90, check=False)
        assert done.returncode == 0, done.stderr
        direct = worker.stub.Generate(build_request(prompt, merge=[("a", 0.7), ("b", 0.3)], strategy="linear",
                                                    max_tokens=8, temperature=0.0), timeout=60)
        text = "".join(m.text for m in direct)
        assert text, "the direct call produced no text"
        assert done.stdout == text + "\n"
        assert "worker test-worker" in done.stderr
    finally:
        router.terminate()
        try:
            router.wait(timeout=30)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait(timeout=30)
