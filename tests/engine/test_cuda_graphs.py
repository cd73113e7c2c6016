"""Decode CUDA graphs, on the CPU: bucket choice, and padded graph steps (emulated by running
the model over the same static buffers a capture records) give the eager engine's outputs."""
from __future__ import annotations

import pytest
import torch

from inference_worker.cuda_graphs import (
    DecodeGraphs,
    bucket_tiles,
    default_buckets,
    lora_tile,
    no_collection,
    pick_bucket,
    rank_bound_for,
    rank_bounds,
    table_width,
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
        assert variant in self.variants[bucket], variant                # a graph was captured for it
        with torch.inference_mode():
            return self.runner.static_decode_forward(bucket, variant)


def _one_adapter_requests(driver: Driver, tokenizer, num: int, base_every: int) -> list:
    """Requests on one adapter, every `base_every`-th base: a graph step's adapter tokens share one segment."""
    return [driver.request(f"s{i}", tokenizer(f"request {i} of a popular adapter").input_ids,
                           "" if i % base_every == base_every - 1 else "a8", max_tokens=6 + i % 3, temperature=0.0)
            for i in range(num)]


def one_adapter_workload(driver: Driver, tokenizer):
    """14 requests in two waves, 12 on one adapter."""
    reqs = _one_adapter_requests(driver, tokenizer, 14, 7)
    return {0: reqs[:7], 1: reqs[7:]}, reqs


def large_one_adapter_workload(driver: Driver, tokenizer):
    """300 requests at once, all on one adapter (a base one would be admitted first while the adapter
    loads): with max_num_seqs 256, steps of 256 decodes on 64-token tiles."""
    reqs = _one_adapter_requests(driver, tokenizer, 300, 301)
    return {0: reqs}, reqs


@pytest.mark.parametrize("workload,tiles,buckets", [(_workload, {1, 2}, (2, 4, 16)),
                                                    (one_adapter_workload, {16}, (2, 4, 16)),
                                                    (large_one_adapter_workload, {64}, (16, 256))])
def test_padded_graph_steps_match_eager(family_model, adapters_of, make_engine, workload, tiles, buckets):
    """Graph steps (emulated) give the eager engine's tokens and logits; each step's segment table has
    its graph's width (table_width: narrower than the bucket on tiles past 1)."""
    model_dir = family_model("llama")
    adapter_dirs = adapters_of(model_dir)
    runs, buckets_used = {}, []
    for name in ("eager", "graphs"):
        engine = make_engine(model_dir, DirSource(adapter_dirs), max_adapter_slots=4, max_lora_rank=32,
                             max_num_seqs=max(buckets))
        if name == "graphs":
            engine.runner.graphs = EmulatedGraphs(engine.runner, buckets)
            prepare = engine.runner.prepare

            def recording_prepare(prefills, decodes, prepare=prepare, pool=engine.runner.slot_pool):
                batch = prepare(prefills, decodes)
                step_rank = max((pool.host_ranks[s.slot] for s in prefills + decodes if s.slot >= 0), default=0)
                assert step_rank <= batch.lora.rank_bound in rank_bounds(pool.max_rank)
                if batch.graph_bucket is not None:
                    buckets_used.append((batch.graph_bucket, len(decodes), batch.lora.block_t))
                    if batch.lora.has_lora:
                        width = table_width(batch.graph_bucket, batch.lora.block_t)
                        assert batch.lora.seg_slots.shape[0] == width and batch.lora.seg_indptr.shape[0] == width + 1
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
    assert [lora_tile(256, g) for g in (1, 7, 8, 64, 65, 170, 171)] == [64, 64, 16, 16, 2, 2, 1]


def test_bucket_tiles_are_the_tiles_its_steps_can_take():
    assert bucket_tiles(1) == (1,) and bucket_tiles(2) == (1, 2) and bucket_tiles(4) == (1, 2, 16)
    assert bucket_tiles(255) == (1, 2, 16) and bucket_tiles(256) == (1, 2, 16, 64)
    for bucket in (1, 3, 5, 16, 48, 100):
        taken = {lora_tile(n, g) for n in range(1, bucket + 1) for g in range(1, n + 1)}
        assert taken == set(bucket_tiles(bucket))


def test_table_width_holds_every_step_of_its_tile():
    """The width is the most segments (adapter segments + one base) of any step the graph serves:
    up to `bucket` adapter tokens over g adapters whose tile is the graph's."""
    for bucket in (1, 2, 4, 8, 16, 48, 64, 96):
        for tile in bucket_tiles(bucket):
            most = max(g for n in range(1, bucket + 1) for g in range(1, n + 1) if lora_tile(n, g) == tile)
            assert table_width(bucket, tile) == min(bucket, most + 1)
    for bucket in (256, 320):                          # 64-token tiles: at the bucket's token count
        for tile in bucket_tiles(bucket):
            most = max(g for g in range(1, bucket + 1) if lora_tile(bucket, g) == tile)
            assert table_width(bucket, tile) == min(bucket, most + 1)
    assert [table_width(256, t) for t in (1, 2, 16, 64)] == [256, 171, 65, 8]
    assert [table_width(64, t) for t in (1, 2, 16)] == [64, 43, 17]


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
