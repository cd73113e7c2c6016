"""Decode CUDA graphs, on the CPU: bucket choice, and padded graph steps (emulated by running
the model over the same static buffers a capture records) give the eager engine's outputs."""
from __future__ import annotations

import pytest
import torch

from inference_worker.cuda_graphs import (
    DecodeGraphs,
    default_buckets,
    lora_tile,
    no_collection,
    pick_bucket,
    rank_bound_for,
    rank_bounds,
)
from tests.engine.doubles import DirSource
from tests.engine.harness import Driver
from tests.engine.test_correctness import _workload


def test_default_buckets():
    assert default_buckets(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert default_buckets(300) == (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 300)
    assert default_buckets(40) == (1, 2, 4, 8, 16, 32, 40)
    assert default_buckets(1) == (1,)


def test_pick_bucket():
    buckets = (1, 2, 4, 8, 16)
    assert [pick_bucket(buckets, n) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert pick_bucket(buckets, 17) is None


class EmulatedGraphs(DecodeGraphs):
    """replay = what the captured graph runs: the model over the runner's static buffers."""

    def __init__(self, runner, buckets) -> None:
        super().__init__(buckets, runner.slot_pool.max_rank)
        self.runner = runner

    def replay(self, bucket: int, variant) -> torch.Tensor:
        assert variant in self.variants, variant                        # a graph was captured for it
        with torch.inference_mode():
            return self.runner.static_decode_forward(bucket, variant)


def one_adapter_workload(driver: Driver, tokenizer):
    """12 requests on one adapter + 2 base: a graph step's adapter tokens share one segment."""
    reqs = [driver.request(f"s{i}", tokenizer(f"request {i} of a popular adapter").input_ids,
                           "" if i % 7 == 0 else "a8", max_tokens=6 + i % 3, temperature=0.0) for i in range(14)]
    return {0: reqs[:8], 1: reqs[8:]}, reqs


@pytest.mark.parametrize("workload,tiles", [(_workload, {1, 2}), (one_adapter_workload, {16})])
def test_padded_graph_steps_match_eager(family_model, adapters_of, make_engine, workload, tiles):
    model_dir = family_model("llama")
    adapter_dirs = adapters_of(model_dir)
    runs, buckets_used = {}, []
    for name in ("eager", "graphs"):
        engine = make_engine(model_dir, DirSource(adapter_dirs), max_adapter_slots=4, max_lora_rank=32)
        if name == "graphs":
            engine.runner.graphs = EmulatedGraphs(engine.runner, (2, 4, 16))
            prepare = engine.runner.prepare

            def recording_prepare(prefills, decodes, prepare=prepare, pool=engine.runner.slot_pool):
                batch = prepare(prefills, decodes)
                step_rank = max((pool.host_ranks[s.slot] for s in prefills + decodes if s.slot >= 0), default=0)
                assert step_rank <= batch.lora.rank_bound in rank_bounds(pool.max_rank)
                if batch.graph_bucket is not None:
                    buckets_used.append((batch.graph_bucket, len(decodes), batch.lora.block_t))
                else:                                   # prompt steps keep the shrink's tuned path at R
                    assert batch.lora.rank_bound == pool.max_rank
                return batch
            engine.runner.prepare = recording_prepare
        driver = Driver(engine)
        arrivals, requests = workload(driver, engine.tokenizer)
        runs[name] = driver.run(arrivals)
    assert any(bucket > n for bucket, n, _ in buckets_used)           # padded rows were run
    assert {tile for _, _, tile in buckets_used} & tiles              # the tile of the workload's shape
    for rid, want in runs["eager"].items():
        got = runs["graphs"][rid]
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5, rtol=1e-5)


def test_padded_base_only_steps_use_the_graph_without_lora(family_model, make_engine):
    engine = make_engine(family_model("llama"))
    engine.runner.graphs = EmulatedGraphs(engine.runner, (4,))
    driver = Driver(engine)
    reqs = [driver.request(f"b{i}", [5 + i, 9, 11], max_tokens=4, temperature=0.0) for i in range(3)]
    batches = []
    prepare = engine.runner.prepare
    engine.runner.prepare = lambda p, d: batches.append(prepare(p, d)) or batches[-1]
    driver.run({0: reqs})
    graph_steps = [b for b in batches if b.graph_bucket is not None]
    assert graph_steps and all(b.graph_bucket == 4 and not b.lora.has_lora and b.lora.block_t is None
                               for b in graph_steps)


def test_rank_bounds():
    assert rank_bounds(64) == (16, 64) and rank_bounds(16) == (16,) and rank_bounds(8) == (8,)
    assert [rank_bound_for(r, 64) for r in (0, 1, 8, 16, 17, 64)] == [16, 16, 16, 16, 64, 64]
    assert rank_bound_for(8, 8) == 8


def test_lora_tile_follows_tokens_per_adapter():
    assert lora_tile(0, 0) is None
    assert [lora_tile(64, g) for g in (64, 47, 32, 17, 16, 8, 4, 1)] == [1, 1, 2, 2, 16, 16, 16, 16]


def test_no_collection_collects_first_then_keeps_the_collector_off():
    """Around graph captures: what sat in reference cycles is freed before (its destructors' CUDA
    calls would invalidate a capture), nothing is collected inside, and the collector's state
    comes back afterwards, also after an error."""
    import gc
    import weakref

    class Cycle:
        pass

    first = Cycle()
    first.me = first
    freed_before = weakref.ref(first)
    del first
    assert gc.isenabled()
    with no_collection():
        assert freed_before() is None and not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), no_collection():
        raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_collection():
            pass
        assert not gc.isenabled()                       # left as the caller had it
    finally:
        gc.enable()
