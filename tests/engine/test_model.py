"""The model and its loader: sharded checkpoints, tied embeddings, rope variants, dtypes."""
from __future__ import annotations

import pytest
import torch
import transformers

from inference_worker.model.llama import LlamaSpec, rope_inv_freq
from tests.engine.harness import Driver, HFReference
from tests.helpers import make_model


@pytest.fixture(scope="module")
def tied_sharded_dir(tmp_path_factory):
    """A tied-embedding tiny Qwen2 re-saved as several safetensors shards with an index."""
    src = make_model(tmp_path_factory.mktemp("tied"), "qwen2", tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("sharded")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="60KB")
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    assert (out / "model.safetensors.index.json").exists()
    return out


def test_sharded_tied_checkpoint_matches_transformers(tied_sharded_dir, make_engine):
    engine = make_engine(tied_sharded_dir)
    assert engine.model.lm_head.weight is engine.model.embed_tokens.weight
    driver = Driver(engine)
    prompt = [5, 9, 40, 41, 200, 3]
    req = driver.request("r", prompt, max_tokens=5, temperature=0.0, ignore_eos=True)
    result = driver.run({0: [req]})["r"]
    want = HFReference(tied_sharded_dir, {}).step_logits("", prompt, result.token_ids)
    torch.testing.assert_close(torch.stack(result.logits), want, atol=1e-4, rtol=1e-4)


def test_missing_weights_are_an_error(tmp_path, tied_sharded_dir):
    import shutil

    from inference_worker.config import EngineConfig
    from inference_worker.engine import LLMEngine
    from tests.engine.doubles import DirSource

    broken = tmp_path / "broken"
    shutil.copytree(tied_sharded_dir, broken)
    shards = sorted(broken.glob("model-*.safetensors"))
    shards[-1].unlink()
    index = broken / "model.safetensors.index.json"
    index.write_text(index.read_text().replace(shards[-1].name, shards[0].name))
    with pytest.raises(ValueError, match="missing"):
        LLMEngine(EngineConfig(device="cpu"), str(broken), DirSource({}))


@pytest.mark.parametrize("rope_type", ["default", "llama3", "linear"])
def test_rope_inv_freq_matches_transformers(rope_type):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": rope_type, "rope_theta": 500000.0}
    if rope_type == "llama3":
        rope |= {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 256}
    if rope_type == "linear":
        rope |= {"factor": 4.0}
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=rope,
                                      max_position_embeddings=4096)
    spec = LlamaSpec.from_hf(config)
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        want = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    else:
        want = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")[0]
    torch.testing.assert_close(rope_inv_freq(spec), want)


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="model_type"):
        LlamaSpec.from_hf(transformers.GPT2Config())
    config = transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type"):
        rope_inv_freq(LlamaSpec.from_hf(config))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(tiny_model_dir, make_engine, dtype):
    prompt = [5, 9, 40, 41, 200, 3]
    rows = {}
    for name in ("float32", dtype):
        engine = make_engine(tiny_model_dir, dtype=name)
        driver = Driver(engine)
        req = driver.request("r", prompt, max_tokens=1, temperature=0.0)
        rows[name] = driver.run({0: [req]})["r"].logits[0]
        assert engine.model.embed_tokens.weight.dtype == getattr(torch, name)
    torch.testing.assert_close(rows[dtype], rows["float32"], atol=0.1, rtol=0.05)
