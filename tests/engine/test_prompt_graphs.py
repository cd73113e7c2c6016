"""Prompt-step piecewise graphs, on the CPU: buckets, and padded steps run as pieces (emulated by
running each piece over the same static buffers a capture records, attention eagerly between
them) give the eager engine's outputs."""
from __future__ import annotations

import pytest
import torch

from inference_worker.prompt_graphs import (
    PROMPT_SHRINK_TILE,
    PROMPT_TILE,
    PromptGraphs,
    default_prompt_buckets,
)
from tests.engine.doubles import DirSource
from tests.engine.harness import Driver
from tests.engine.test_correctness import _workload
from tests.engine.test_cuda_graphs import EmulatedGraphs


def test_default_prompt_buckets():
    assert default_prompt_buckets(2048) == tuple(range(128, 2049, 128))
    assert default_prompt_buckets(8192) == default_prompt_buckets(2048)     # larger steps run eagerly
    assert default_prompt_buckets(300) == (128, 256, 300)
    assert default_prompt_buckets(64) == (64,)


def test_bucket_for():
    graphs = PromptGraphs((16, 48, 128), num_pieces=3)
    assert [graphs.bucket_for(n) for n in (1, 16, 17, 100, 128)] == [16, 16, 48, 128, 128]
    assert graphs.bucket_for(129) is None


class EmulatedPromptGraphs(PromptGraphs):
    """run = what the captured pieces replay: each piece over the runner's static buffers, with
    the caller's eager attention between them."""

    def __init__(self, runner, buckets) -> None:
        super().__init__(buckets, runner.model.spec.num_layers + 1)
        self.runner = runner
        self.runs: list[tuple[int, bool]] = []

    def run(self, bucket: int, has_lora: bool, attend) -> None:
        self.runs.append((bucket, has_lora))
        with torch.inference_mode():
            for i in range(self.num_pieces):
                self.runner.static_prompt_piece(bucket, has_lora, i)
                if i < self.num_pieces - 1:
                    attend(i)


@pytest.mark.parametrize("decode_graphs", [False, True])
def test_padded_prompt_pieces_match_eager(family_model, adapters_of, make_engine, decode_graphs):
    model_dir = family_model("llama")
    adapter_dirs = adapters_of(model_dir)
    runs, steps = {}, []
    for name in ("eager", "pieces"):
        # a32's fetch lags: its prompts come in a later step (more prompt steps, with and without LoRA)
        engine = make_engine(model_dir, DirSource(adapter_dirs, delays={"a32": 3}), max_adapter_slots=4,
                             max_lora_rank=32)
        if name == "pieces":
            runner = engine.runner
            graphs = EmulatedPromptGraphs(runner, (16, 40))   # its 54-token step runs eagerly
            runner.attach_prompt_graphs(graphs)
            if decode_graphs:
                runner.graphs = EmulatedGraphs(runner, (2, 4, 16))
            prepare = runner.prepare

            def recording_prepare(prefills, decodes, prepare=prepare, runner=runner):
                batch = prepare(prefills, decodes)
                steps.append((batch.prompt_bucket, batch.num_tokens, batch.graph_bucket))
                if batch.prompt_bucket is not None:
                    assert batch.lora.block_t == PROMPT_TILE and batch.lora.seg_slots.numel() == runner.max_num_seqs
                    assert batch.lora.shrink_config["block_t"] == PROMPT_SHRINK_TILE
                return batch
            runner.prepare = recording_prepare
        driver = Driver(engine)
        arrivals, _ = _workload(driver, engine.tokenizer)
        runs[name] = driver.run(arrivals)
    pieces = [(b, n) for b, n, _ in steps if b is not None]
    assert any(b > n for b, n in pieces)                             # padded rows were run
    assert any(has_lora for _, has_lora in graphs.runs)
    assert any(b is None and g is None for b, _, g in steps)         # too many tokens for a bucket: eager
    if decode_graphs:
        assert any(g is not None for _, _, g in steps)
    for rid, want in runs["eager"].items():
        got = runs["pieces"][rid]
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5, rtol=1e-5)


def test_base_only_prompt_steps_run_the_pieces_without_lora(family_model, make_engine):
    runs = {}
    for name in ("eager", "pieces"):
        engine = make_engine(family_model("llama"))
        if name == "pieces":
            graphs = EmulatedPromptGraphs(engine.runner, (8, 32))
            engine.runner.attach_prompt_graphs(graphs)
        driver = Driver(engine)
        reqs = [driver.request(f"b{i}", [5 + i, 9, 11, 3][: 2 + i], max_tokens=4, temperature=0.0) for i in range(3)]
        runs[name] = driver.run({0: reqs})
    # the 9-token prompt step pads to 32, decode steps (no decode graphs here) to 8
    assert {b for b, _ in graphs.runs} == {8, 32} and not any(has_lora for _, has_lora in graphs.runs)
    for rid, want in runs["eager"].items():
        assert runs["pieces"][rid].token_ids == want.token_ids
        torch.testing.assert_close(torch.stack(runs["pieces"][rid].logits), torch.stack(want.logits),
                                   atol=1e-5, rtol=1e-5)
