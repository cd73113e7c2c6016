"""Decode CUDA graphs and async adapter loads on a GPU: replay gives the eager engine's outputs."""
from __future__ import annotations

import pytest
import torch

from inference_worker.config import EngineConfig
from inference_worker.engine import LLMEngine
from tests.engine.doubles import DirSource
from tests.engine.harness import Driver
from tests.engine.test_correctness import _workload
from tests.engine.test_cuda_graphs import large_one_adapter_workload, one_adapter_workload

pytestmark = pytest.mark.gpu


def _run(model_dir, adapter_dirs, dtype, cuda_graphs, workload=_workload, **config_flags):
    # kernels compile on first use here: the warm-up has its own test (below)
    config_flags = {"warm_kernels": False, "max_num_seqs": 16, **config_flags}
    config = EngineConfig(device="cuda", dtype=dtype, max_adapter_slots=2, max_lora_rank=32,
                          max_model_len=128, cuda_graphs=cuda_graphs, **config_flags)
    engine = LLMEngine(config, str(model_dir), DirSource(adapter_dirs))
    try:
        replays = []          # (decode bucket, LoRA variant) per decode-graph step, ("prompt", has_lora) per prompt one
        runner = engine.runner
        if runner.graphs is not None:
            replay = runner.graphs.replay
            runner.graphs.replay = lambda b, variant: replays.append((b, variant)) or replay(b, variant)
        if runner.prompt_graphs is not None:
            run = runner.prompt_graphs.run
            runner.prompt_graphs.run = lambda b, has_lora, attend: replays.append(("prompt", has_lora)) or run(
                b, has_lora, attend)
        driver = Driver(engine)
        arrivals, _ = workload(driver, engine.tokenizer)
        return driver.run(arrivals), replays, engine.slot_pool.num_evictions
    finally:
        engine.stop()


# 256 decodes of one adapter: graphs of bucket 256 on 64-token tiles, segment tables 8 wide
LARGE = {"max_num_seqs": 256, "cuda_graph_buckets": (16, 256)}


@pytest.mark.parametrize("workload,tiles,flags", [(_workload, {1, 2}, {}), (one_adapter_workload, {16}, {}),
                                                  (large_one_adapter_workload, {64}, LARGE)])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 0.1)])
def test_graph_replay_matches_eager(family_model, adapters_of, dtype, tol, workload, tiles, flags):
    model_dir = family_model("llama")
    adapter_dirs = adapters_of(model_dir)
    eager, no_replays, _ = _run(model_dir, adapter_dirs, dtype, cuda_graphs=False, workload=workload, **flags)
    graphs, replays, evictions = _run(model_dir, adapter_dirs, dtype, cuda_graphs=True, workload=workload, **flags)
    assert not no_replays and ("prompt", True) in replays                 # prompt steps ran as pieces
    assert {variant[0] for b, variant in replays if b != "prompt" and variant} & tiles
    if workload is _workload:
        assert evictions > 0                            # adapters swapped through the async copy path
    for rid, want in eager.items():
        got = graphs[rid]
        if dtype == "float32":
            assert_same_greedy_tokens(rid, got, want, tie=1e-4)
        torch.testing.assert_close(got.logits[0], want.logits[0], atol=tol, rtol=tol)   # same inputs


def test_graphs_without_lora_overlap_match_eager(family_model, adapters_of):
    """The graphs' LoRA kernels all on one stream give the eager outputs (the default, the
    shrinks on a side stream, is the test above)."""
    model_dir = family_model("llama")
    adapter_dirs = adapters_of(model_dir)
    eager, _, _ = _run(model_dir, adapter_dirs, "float32", cuda_graphs=False)
    graphs, replays, _ = _run(model_dir, adapter_dirs, "float32", cuda_graphs=True, lora_overlap=False)
    assert any(variant for b, variant in replays if b != "prompt") and ("prompt", True) in replays
    for rid, want in eager.items():
        assert_same_greedy_tokens(rid, graphs[rid], want, tie=1e-4)
        torch.testing.assert_close(graphs[rid].logits[0], want.logits[0], atol=1e-3, rtol=1e-3)


def test_graphs_join_the_side_stream_before_the_expand(family_model, adapters_of, monkeypatch):
    """Each shrink held back on its side stream (a spin kernel first, captured with it) still
    gives the eager outputs: the expand waits for the shrink (a missing join would read a stale y)."""
    from inference_worker.lora.layers import LoRALinear

    shrink = LoRALinear._shrink

    def slow_shrink(self, x, lora):
        if lora.side_stream is not None:
            torch.cuda._sleep(1_000_000)                  # ~0.5 ms: far longer than the base matmul
        return shrink(self, x, lora)
    monkeypatch.setattr(LoRALinear, "_shrink", slow_shrink)
    model_dir = family_model("llama")
    adapter_dirs = adapters_of(model_dir)
    eager, _, _ = _run(model_dir, adapter_dirs, "float32", cuda_graphs=False)
    graphs, replays, _ = _run(model_dir, adapter_dirs, "float32", cuda_graphs=True)
    assert ("prompt", True) in replays
    for rid, want in eager.items():
        assert_same_greedy_tokens(rid, graphs[rid], want, tie=1e-4)
        torch.testing.assert_close(graphs[rid].logits[0], want.logits[0], atol=1e-3, rtol=1e-3)


def assert_same_greedy_tokens(rid, got, want, tie: float) -> None:
    """Equal greedy tokens, except that a near-tie in the eager logits (top-2 gap < tie) may
    go either way; the sequences differ from there on, so comparison stops there. (Split-K
    shrinks add with fp32 atomics: the last bits of a run are not deterministic.)"""
    for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)):
        if a != b:
            top2 = want.logits[i].topk(2).values
            assert float(top2[0] - top2[1]) < tie, f"{rid}: token {i} differs ({a} vs {b}) without a near-tie"
            return
    assert len(got.token_ids) == len(want.token_ids), rid


SYNC = {"overlap_outputs": False, "adapter_load_thread": False, "async_scheduling": False}


@pytest.mark.parametrize("flags", [{}, {"adapter_load_thread": False}, {"async_scheduling": False}])
def test_background_work_gives_the_same_outputs(family_model, adapters_of, flags):
    """Adapter copies issued by the loader thread, and/or steps scheduled before the previous
    one's tokens are read back (the EngineConfig flags; {} = the CUDA defaults, all on),
    adapters swapped through 2 slots: the same greedy tokens as the synchronous engine."""
    model_dir = family_model("llama")
    adapter_dirs = adapters_of(model_dir)
    want, _, _ = _run(model_dir, adapter_dirs, "float32", cuda_graphs=True, **SYNC)
    got, _, evictions = _run(model_dir, adapter_dirs, "float32", cuda_graphs=True, **flags)
    assert evictions > 0
    for rid, w in want.items():
        assert_same_greedy_tokens(rid, got[rid], w, tie=1e-4)


@pytest.mark.parametrize("switch,off,on", [("OPENLORA_FUSED_DECODE", "0", "1"), ("OPENLORA_SGMV_PDL", "0", "1")])
def test_kernel_switches_give_the_same_outputs(family_model, adapters_of, monkeypatch, switch, off, on):
    """The kernel switches (the experimental fused decode LoRA; programmatic dependent launch, on
    by default) in the engine with its decode graphs: the same greedy tokens either way."""
    model_dir = family_model("llama")
    adapter_dirs = adapters_of(model_dir)
    monkeypatch.setenv(switch, off)
    want, _, _ = _run(model_dir, adapter_dirs, "float32", cuda_graphs=True)
    monkeypatch.setenv(switch, on)
    got, _, _ = _run(model_dir, adapter_dirs, "float32", cuda_graphs=True)
    for rid, w in want.items():
        assert_same_greedy_tokens(rid, got[rid], w, tie=1e-4)


def _compiled_sgmv_variants() -> int:
    from kernels import sgmv_expand, sgmv_shrink
    total = 0
    for kernel in (sgmv_shrink._sgmv_shrink_kernel, sgmv_expand._sgmv_expand_kernel):
        caches = getattr(kernel, "device_caches", None)       # triton >= 3.2: device -> (kernels, ...)
        if caches is None:
            pytest.skip("this triton keeps its compiled kernels elsewhere")
        total += sum(len(cache[0]) for cache in caches.values())
    return total


def test_warm_kernels_leave_nothing_to_compile_while_serving(family_model, adapters_of):
    """With the warm-up (the CUDA default), a run of mixed prompt and decode steps compiles no new
    SGMV variant: every eager step's launch choices were compiled at start (lora/warmup.py)."""
    model_dir = family_model("llama")
    config = EngineConfig(device="cuda", dtype="bfloat16", max_adapter_slots=2, max_lora_rank=32, max_num_seqs=16,
                          max_model_len=128, warm_kernels=True)
    engine = LLMEngine(config, str(model_dir), DirSource(adapters_of(model_dir)))
    try:
        before = _compiled_sgmv_variants()
        driver = Driver(engine)
        arrivals, _ = _workload(driver, engine.tokenizer)
        driver.run(arrivals)
        assert _compiled_sgmv_variants() == before
    finally:
        engine.stop()
