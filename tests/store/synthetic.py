"""Adapters written directly (no model needed) and raw upload streams, for the store tests.

`write_adapter` makes a PEFT-layout directory with safetensors weights of any size
in milliseconds; `upload_requests` builds the raw gRPC request stream, so tests
can send exactly the (bad) messages they want.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from protos import adapter_store_pb2 as pb

PREFIX = "base_model.model.model.layers"
SIZES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}   # module: (in, out)


def lora_config(rank: int = 8, alpha: float = 16.0, modules=("q_proj", "v_proj"), **extra) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules),
            "base_model_name_or_path": "tiny-llama", "bias": "none", "use_rslora": False,
            "rank_pattern": {}, "alpha_pattern": {}, "task_type": "CAUSAL_LM", **extra}


def lora_tensors(rank: int = 8, modules=("q_proj", "v_proj"), num_layers: int = 2, seed: int = 0,
                 dtype=torch.float32, sizes=None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for m in modules:
            d_in, d_out = (sizes or SIZES)[m]
            name = f"{PREFIX}.{layer}.self_attn.{m}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen).to(dtype)
            tensors[f"{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen).to(dtype)
    return tensors


def write_adapter(out_dir: Path, config: dict | None = None, tensors: dict | None = None, **kwargs) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or lora_config(**{k: v for k, v in kwargs.items() if k in ("rank", "modules")})
    tensors = tensors if tensors is not None else lora_tensors(**kwargs)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def chunked(data: bytes, size: int = 1 << 20):
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


def upload_requests(name: str, config: bytes | None, weights: bytes | None, *, base_model: str = "",
                    weights_filename: str = "adapter_model.safetensors", chunk: int = 1 << 20,
                    header: bool = True) -> list[pb.UploadAdapterRequest]:
    requests = []
    if header:
        requests.append(pb.UploadAdapterRequest(header=pb.UploadHeader(name=name, base_model=base_model)))
    if config is not None:
        requests.append(pb.UploadAdapterRequest(chunk=pb.FileChunk(
            file=pb.ADAPTER_FILE_CONFIG, data=config, filename="adapter_config.json")))
    for part in chunked(weights, chunk) if weights is not None else []:
        requests.append(pb.UploadAdapterRequest(chunk=pb.FileChunk(
            file=pb.ADAPTER_FILE_WEIGHTS, data=part, filename=weights_filename)))
    return requests


def dir_requests(name: str, adapter_dir: Path, **kwargs) -> list[pb.UploadAdapterRequest]:
    return upload_requests(name, (adapter_dir / "adapter_config.json").read_bytes(),
                           (adapter_dir / "adapter_model.safetensors").read_bytes(), **kwargs)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
