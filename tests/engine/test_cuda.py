"""The engine on a CUDA GPU with the Triton kernels (skipped without one)."""
from __future__ import annotations

import pytest
import torch

from inference_worker.config import EngineConfig
from inference_worker.engine import LLMEngine
from tests.engine.doubles import DirSource
from tests.engine.harness import Driver, HFReference, check_against_hf
from tests.engine.test_correctness import _workload

pytestmark = pytest.mark.gpu


def _run(model_dir, adapter_dirs, dtype, **overrides):
    overrides = {"warm_kernels": False, **overrides}       # compiled on first use: the warm-up has its own test
    config = EngineConfig(device="cuda", dtype=dtype, max_adapter_slots=2, max_lora_rank=32, **overrides)
    engine = LLMEngine(config, str(model_dir), DirSource(adapter_dirs))
    try:
        driver = Driver(engine)
        arrivals, requests = _workload(driver, engine.tokenizer)
        return engine, requests, driver.run(arrivals)
    finally:
        engine.stop()


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_cuda_float32_matches_transformers_peft(family, family_model, adapters_of):
    model_dir = family_model(family)
    adapter_dirs = adapters_of(model_dir)
    engine, requests, results = _run(model_dir, adapter_dirs, "float32", num_kv_blocks=8, block_size=8,
                                     max_num_batched_tokens=64, max_model_len=64)
    assert engine.ops.name == "triton"
    assert engine.scheduler.num_preemptions > 0 and engine.slot_pool.num_evictions > 0
    check_against_hf(HFReference(model_dir, adapter_dirs), requests, results, generate=False, atol=2e-3, rtol=2e-3)


def test_cuda_bfloat16_close_to_float32(family_model, adapters_of):
    model_dir = family_model("llama")
    adapter_dirs = adapters_of(model_dir)
    _, requests, results = _run(model_dir, adapter_dirs, "bfloat16")
    ref = HFReference(model_dir, adapter_dirs)
    for req in requests:
        got = results[req.request_id].logits[0]            # first step: same inputs as the reference
        want = ref.step_logits(req.adapter, req.prompt_token_ids, results[req.request_id].token_ids[:1])[0]
        torch.testing.assert_close(got, want, atol=0.15, rtol=0.05)
