"""Load a Llama-family model from a local Hugging Face directory.

Config and tokenizer come through transformers (AutoConfig, AutoTokenizer); the
weights are read tensor by tensor from safetensors (one file, or shards listed in
model.safetensors.index.json) straight into the fused parameters of our model, so
peak memory is the model once.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from inference_worker.model.llama import LlamaForCausalLM, LlamaSpec
from inference_worker.model.random_init import random_model
from kernels.backend import KernelOps

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_NORM_RE = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
# HF projection -> (our fused module, index of the part in its out_sizes)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
          "down_proj": ("down_proj", 0)}


def load_hf_config(model_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {model_dir} (pickled .bin is not read)")
    return found


def _target(model: LlamaForCausalLM, name: str) -> torch.Tensor | None:
    """The slice of our parameter that HF tensor `name` fills; None = not ours (ignored)."""
    if name == "model.embed_tokens.weight":
        return model.embed_tokens.weight
    if name == "model.norm.weight":
        return model.norm.weight
    if name == "lm_head.weight":
        return None if model.spec.tie_word_embeddings else model.lm_head.weight
    m = _NORM_RE.match(name)
    if m:
        return getattr(model.layers[int(m.group(1))], m.group(2)).weight
    m = _LAYER_RE.match(name)
    if not m or m.group(3) not in _FUSED:
        return None
    fused_name, part = _FUSED[m.group(3)]
    block = getattr(model.layers[int(m.group(1))], m.group(2))
    lora_linear = getattr(block, fused_name)
    param = getattr(lora_linear.base_layer, m.group(4))
    if param is None:
        raise ValueError(f"checkpoint has {name} but the config says that projection has no bias")
    lo, hi = lora_linear.out_offsets[part], lora_linear.out_offsets[part + 1]
    return param[lo:hi]


def _expected_names(spec: LlamaSpec) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not spec.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(spec.num_layers):
        names |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
        for proj, (fused, _) in _FUSED.items():
            block = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
            names.add(f"model.layers.{i}.{block}.{proj}.weight")
            has_bias = {"qkv_proj": spec.qkv_bias, "o_proj": spec.o_bias}.get(fused, spec.mlp_bias)
            if has_bias:
                names.add(f"model.layers.{i}.{block}.{proj}.bias")
    return names


def load_model(model_dir: str | Path, ops: KernelOps, device: torch.device, dtype: torch.dtype,
               max_len: int, random_weights: bool = False) -> LlamaForCausalLM:
    """random_weights: config.json only, weights drawn on the device (random_init.py)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    spec = LlamaSpec.from_hf(load_hf_config(model_dir))
    if random_weights:
        return random_model(spec, ops, device, dtype, max_len)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, ops)
    model = model.to_empty(device=device).to(dtype)
    if spec.tie_word_embeddings:          # to_empty makes new tensors: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    missing = _expected_names(spec)
    with torch.no_grad():
        for path in _safetensors_files(model_dir):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    target = _target(model, name)
                    if target is None:
                        continue
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected "
                                         f"{tuple(target.shape)}")
                    target.copy_(tensor)
                    missing.discard(name)
    if missing:
        raise ValueError(f"weights missing from {model_dir}: {sorted(missing)[:5]}")
    model.init_rope(max_len)
    return model.eval()
