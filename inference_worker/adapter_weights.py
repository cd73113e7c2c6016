"""An adapter's LoRA weights in memory, independent of where they came from.

Produced by loading a store blob (services/adapter_format.py) or by merging
several adapters (merge.py); consumed by the slot pool, which copies them into
the device buffers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference_worker.blob_reader import read_safetensors
from services.adapter_format import CONFIG_METADATA_KEY, lora_scaling, parse_lora_key

ModuleKey = tuple[int, str]  # (layer index, "q_proj" | ... | "down_proj")


@dataclass
class AdapterWeights:
    key: str                      # "name@version", or "merge:<hash>" for a merged recipe
    base_model: str
    rank: int                     # max rank over modules (slots are sized by it)
    scaling: float                # applied to B·A·x: alpha/r (or alpha/sqrt(r) with rsLoRA)
    # (layer, module) -> (A [r, in], B [out, r]); modules absent contribute zero
    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())

    @property
    def target_modules(self) -> set[str]:
        return {module for _, module in self.modules}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           pin_memory: bool = False) -> "AdapterWeights":
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype)
            return t.pin_memory() if pin_memory and t.device.type == "cpu" else t
        return AdapterWeights(self.key, self.base_model, self.rank, self.scaling,
                              {k: (move(a), move(b)) for k, (a, b) in self.modules.items()})


def adapter_from_state_dict(key: str, config: dict, tensors: dict[str, torch.Tensor]) -> AdapterWeights:
    """Build from PEFT's adapter_config dict and its safetensors state dict."""
    rank = int(config["r"])
    scaling = lora_scaling(rank, float(config.get("lora_alpha", rank)), bool(config.get("use_rslora", False)))
    pairs: dict[ModuleKey, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parsed = parse_lora_key(name)
        if parsed is None:
            raise ValueError(f"unexpected tensor {name!r} in adapter {key}")
        pairs.setdefault((parsed.layer, parsed.module), {})[parsed.which] = tensor
    modules = {}
    for mkey, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter {key}: {mkey} has lora_{''.join(pair)} without its pair")
        modules[mkey] = (pair["A"], pair["B"])
    return AdapterWeights(key, str(config.get("base_model_name_or_path") or ""), rank, scaling, modules)


def load_adapter_blob(path: str | Path, key: str, *, pin_memory: bool = False) -> AdapterWeights:
    """Load a store blob (safetensors with the PEFT config in its metadata), read once into
    page-locked memory when pin_memory (what the CPU tier holds on CUDA)."""
    meta, tensors = read_safetensors(path, pin_memory=pin_memory)
    if CONFIG_METADATA_KEY not in meta:
        raise ValueError(f"blob {path} has no embedded adapter_config")
    return adapter_from_state_dict(key, json.loads(meta[CONFIG_METADATA_KEY]), tensors)


def load_peft_dir(path: str | Path, key: str) -> AdapterWeights:
    """Load a PEFT save_pretrained directory (tests, local tools)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    return adapter_from_state_dict(key, config, load_file(str(path / "adapter_model.safetensors")))
