"""EngineConfig validation and the KV budget."""
from __future__ import annotations

import pytest
import torch

from inference_worker.config import EngineConfig


@pytest.mark.parametrize("bad", [{"dtype": "int8"}, {"device": "tpu:x"}, {"block_size": 0}, {"max_num_seqs": 0},
                                 {"hold_prefill_steps": -1},
                                 {"num_kv_blocks": 0}, {"kv_memory_fraction": 1.5},
                                 {"max_num_seqs": 64, "max_num_batched_tokens": 32}, {"max_lora_rank": 0}])
def test_invalid_configs(bad):
    with pytest.raises(ValueError):
        EngineConfig(**bad)


def test_defaults_and_resolution():
    config = EngineConfig(device="cpu")
    assert config.torch_dtype == torch.float32 and config.torch_device.type == "cpu"
    resolved = config.resolved(model_max_len=4096)
    assert resolved.max_model_len == 4096 and resolved.max_num_batched_tokens == 4096
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(max_model_len=8192).resolved(4096)
    with pytest.raises(ValueError, match="chunked prefill"):
        EngineConfig(max_model_len=1024, max_num_batched_tokens=512).resolved(4096)


def test_kv_blocks_from_a_byte_budget(tiny_model_dir, make_engine):
    # tiny model: 2 layers x K and V x 16 tokens x 2 kv heads x 16 dims x 4 bytes = 8 KiB per block
    engine = make_engine(tiny_model_dir, kv_cache_bytes=8192 * 10 + 100)
    assert engine.block_manager.num_blocks == 10
    assert engine.runner.kv_cache_bytes == 8192 * 10
    # never more blocks than max_num_seqs full-length sequences use
    engine = make_engine(tiny_model_dir, max_num_seqs=2, max_model_len=64)
    assert engine.block_manager.num_blocks == 2 * 4


@pytest.mark.parametrize("device,on", [("cpu", False), ("cuda", True), ("cuda:0", True)])
def test_background_work_defaults_follow_the_device(device, on):
    resolved = EngineConfig(device=device).resolved(4096)      # no GPU needed: nothing is allocated
    assert resolved.overlap_outputs is on and resolved.adapter_load_thread is on and resolved.async_scheduling is on
    assert resolved.warm_kernels is on
    chosen = EngineConfig(device=device, async_scheduling=False, adapter_load_thread=True,
                          warm_kernels=False).resolved(4096)
    assert chosen.async_scheduling is False and chosen.adapter_load_thread is True and chosen.warm_kernels is False
