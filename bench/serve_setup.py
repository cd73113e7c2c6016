"""What bench/serve.py serves: a model dir and PEFT adapter dirs for it, made here.

Two kinds of model:
  * a tiny Llama with real (random) safetensors weights (MODELS, services.tiny_model);
  * a real geometry by name (bench.engine_setup.GEOMETRIES, e.g. llama3-8b): config.json and a
    tokenizer only, the workers drawing random weights on the device (`--random-weights`), so a
    benchmark of the Llama-3-8B shape needs no 16 GB of files.
Adapters are real PEFT dirs (adapter_config.json + adapter_model.safetensors): peft makes one on
a model with real weights (the model itself, or a tiny stand-in for a geometry) for the config and
the tensor names; every adapter's tensors are then drawn afresh at the served model's shapes, bf16.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.engine_setup import GEOMETRIES, PROJECTIONS, adapter_bytes, make_model_dir, projection_dims
from inference_worker.adapter_checks import base_model_name
from services.store_client import CONFIG_FILE, WEIGHTS_FILE
from services.tiny_model import TinyModelConfig, init_model

MODELS = {"tiny": TinyModelConfig(),
          "small": TinyModelConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4)}
MB = 1 << 20


@dataclass
class ServedModel:
    model_dir: Path
    label: str                      # what the report calls it
    worker_flags: list[str]         # flags the model needs on every worker


def make_served_model(args, tmp: Path) -> ServedModel:
    """--model-dir, else --geometry (random weights on the device), else the tiny --model."""
    if args.model_dir:
        return ServedModel(Path(args.model_dir).resolve(), args.model_dir, [])
    if args.geometry:
        model_dir = make_model_dir(args.geometry, tmp / "model")
        # the CPU tier holds every adapter (the default 4 GB is 48 Llama-3-8B rank-16 adapters)
        cache_mb = max(4096, int(1.25 * args.num_adapters * adapter_bytes(args.geometry, args.rank) / MB))
        return ServedModel(model_dir, f"{args.geometry} (random bf16 weights drawn on the device)",
                           ["--random-weights", "--cpu-cache-mb", str(cache_mb)])
    return ServedModel(init_model(tmp / "model", MODELS[args.model]), f"init_model({args.model})", [])


def make_adapters(model_dir: Path, out: Path, num: int, rank: int, seed: int, geometry: str = "") -> list[Path]:
    """num PEFT adapter dirs (rank, all 7 projections) for model_dir: peft makes a template once;
    adapter i's tensors are drawn from seed + i (on the GPU when there is one: 100 Llama-3-8B
    adapters are 4.2 G values)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from services.peft_adapter import make_adapter

    peft_model = init_model(out / "template-model", MODELS["tiny"]) if geometry else model_dir
    template = make_adapter(peft_model, out / "template", rank=rank, alpha=2.0 * rank,
                            target_modules=tuple(PROJECTIONS), seed=seed, base_model=base_model_name(model_dir))
    with safe_open(template / WEIGHTS_FILE, "pt") as f:
        metadata = f.metadata()
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    if geometry:
        shapes = geometry_shapes(shapes, geometry, rank)
    config = (template / CONFIG_FILE).read_text()
    total = sum(a * b for a, b in shapes.values())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dirs = []
    for i in range(num):
        adapter_dir = out / f"a{i}"
        adapter_dir.mkdir(parents=True, exist_ok=True)
        (adapter_dir / CONFIG_FILE).write_text(config)
        gen = torch.Generator(device=device).manual_seed(seed + i)
        flat = (torch.randn(total, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        tensors, offset = {}, 0
        for name, shape in shapes.items():
            tensors[name] = flat[offset: offset + shape[0] * shape[1]].view(shape).clone()
            offset += shape[0] * shape[1]
        save_file(tensors, str(adapter_dir / WEIGHTS_FILE), metadata=metadata)
        dirs.append(adapter_dir)
    return dirs


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def geometry_shapes(template: dict[str, tuple], geometry: str, rank: int) -> dict[str, tuple]:
    """The template's layer-0 tensor names for every layer of the geometry, at its shapes:
    lora_A [rank, in], lora_B [out, rank]."""
    dims = projection_dims(geometry)
    names = sorted(name for name in template if _LAYER.search(name).group(1) == "0")
    if {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names} != set(PROJECTIONS):
        raise ValueError(f"template adapter lacks some of {sorted(PROJECTIONS)}: {names}")
    shapes = {}
    for layer in range(GEOMETRIES[geometry]["num_hidden_layers"]):
        for name in names:
            d_in, d_out = PROJECTIONS[name.split(".lora_")[0].rsplit(".", 1)[1]]
            shape = (rank, dims[d_in]) if ".lora_A." in name else (dims[d_out], rank)
            shapes[_LAYER.sub(f".layers.{layer}.", name, count=1)] = shape
    return shapes


def describe(model_dir: Path, label: str) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    return {k: config.get(k) for k in keys} | {"dir": label}
