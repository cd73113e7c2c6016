"""Validate a PEFT LoRA upload before anything is indexed: config, then the weights header.

The safetensors header is parsed without loading a tensor (services.adapter_format);
tensor names, shapes, dtypes and pairing are checked against the config. Every
failure is InvalidArgument with the reason.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from services.adapter_format import TARGET_MODULES, FormatError, parse_lora_key, read_safetensors_header
from services.errors import InvalidArgument

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# config keys whose non-default value changes what the weights mean; the worker computes plain LoRA only
_UNSUPPORTED = {
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
}


@dataclass
class ValidatedAdapter:
    config: dict                 # the parsed adapter_config.json
    header: dict                 # the safetensors header (tensor entries and __metadata__)
    data_start: int              # byte offset of the tensor data in the weights file
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]    # sorted
    base_model: str              # from the config; may be empty


def check_filename(filename: str, expected_suffix: str) -> None:
    """Refuse pickle (loading it runs code) and anything not named like the PEFT file it carries."""
    lower = filename.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise InvalidArgument(f"{filename!r}: pickle files are refused (loading them can run code); "
                              "save the adapter with safetensors (save_pretrained(safe_serialization=True))")
    if filename and not lower.endswith(expected_suffix):
        raise InvalidArgument(f"{filename!r}: expected a {expected_suffix} file")


def _number(config: dict, key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"adapter_config.json: {key} must be a number, got {value!r}")
    return float(value)


def validate_config(config_bytes: bytes, max_rank: int) -> dict:
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument("adapter_config.json must be a JSON object")
    if config.get("peft_type") != "LORA":
        raise InvalidArgument(
            f"adapter_config.json is not a LoRA config (peft_type={config.get('peft_type')!r})")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise InvalidArgument(f"adapter_config.json: {what} is not supported")
    if config.get("bias", "none") not in ("none", None):
        raise InvalidArgument(f"adapter_config.json: bias={config['bias']!r} is not supported (only 'none')")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidArgument(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise InvalidArgument(f"adapter_config.json: rank {rank} is over this store's limit of {max_rank}")
    _number(config, "lora_alpha")
    modules = config.get("target_modules")
    if isinstance(modules, str):
        raise InvalidArgument("adapter_config.json: target_modules as a regex string is not supported; "
                              "list the module names")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise InvalidArgument("adapter_config.json: target_modules must be a non-empty list of module names")
    for m in modules:
        if m not in TARGET_MODULES:
            raise InvalidArgument(f"adapter_config.json: target module {m!r} is not supported "
                                  f"(supported: {', '.join(TARGET_MODULES)})")
    if not isinstance(config.get("use_rslora", False), bool):
        raise InvalidArgument("adapter_config.json: use_rslora must be true or false")
    base_model = config.get("base_model_name_or_path") or ""
    if not isinstance(base_model, str):
        raise InvalidArgument("adapter_config.json: base_model_name_or_path must be a string")
    return config


def _check_tensors(header: dict, rank: int, modules: set[str]) -> None:
    """Names are lora_A/lora_B of a target module; A is [r, in], B is [out, r]; they pair up;
    a module has one in/out size across layers."""
    seen: dict[tuple[int, str, str], str] = {}
    dims: dict[tuple[str, str], int] = {}     # (module, "in"|"out") -> size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        key = parse_lora_key(name)
        if key is None:
            raise InvalidArgument(f"unexpected tensor {name!r}: only lora_A/lora_B weights of "
                                  f"{', '.join(TARGET_MODULES)} are accepted")
        if key.module not in modules:
            raise InvalidArgument(
                f"tensor {name!r}: module {key.module} is not in target_modules {sorted(modules)}")
        if (key.layer, key.module, key.which) in seen:
            raise InvalidArgument(
                f"tensors {seen[key.layer, key.module, key.which]!r} and {name!r} are the same weight")
        seen[key.layer, key.module, key.which] = name
        shape = info["shape"]
        if len(shape) != 2 or shape[0 if key.which == "A" else 1] != rank:
            want = f"[{rank}, in]" if key.which == "A" else f"[out, {rank}]"
            raise InvalidArgument(
                f"tensor {name!r}: shape {shape} does not match rank {rank} (expected {want})")
        io, size = ("in", shape[1]) if key.which == "A" else ("out", shape[0])
        if dims.setdefault((key.module, io), size) != size:
            raise InvalidArgument(f"tensor {name!r}: {io} size {size} differs from other {key.module} layers "
                                  f"({dims[key.module, io]})")
    for layer, module, which in seen:
        other = "B" if which == "A" else "A"
        if (layer, module, other) not in seen:
            raise InvalidArgument(f"layer {layer} {module}: lora_{which} without its lora_{other}")
    missing = modules - {module for _, module, _ in seen}
    if missing:
        raise InvalidArgument(
            f"target_modules {sorted(missing)} have no weights in adapter_model.safetensors")


def validate_adapter(config_bytes: bytes, weights_path: Path, max_rank: int) -> ValidatedAdapter:
    config = validate_config(config_bytes, max_rank)
    try:
        with open(weights_path, "rb") as f:
            header, data_start = read_safetensors_header(f, weights_path.stat().st_size)
    except FormatError as exc:
        raise InvalidArgument(f"adapter_model.safetensors: {exc}") from None
    modules = set(config["target_modules"])
    _check_tensors(header, config["r"], modules)
    return ValidatedAdapter(
        config=config, header=header, data_start=data_start, rank=config["r"],
        lora_alpha=_number(config, "lora_alpha"), use_rslora=config.get("use_rslora", False),
        target_modules=sorted(modules), base_model=config.get("base_model_name_or_path") or "")
