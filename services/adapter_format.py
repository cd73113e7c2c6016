"""The adapter blob format shared by the store (validates, writes) and workers (read).

A stored adapter is ONE content-addressed file: the PEFT `adapter_model.safetensors`
whose header metadata also carries the PEFT `adapter_config.json` text under
CONFIG_METADATA_KEY. One blob, one sha256, and it is still a valid safetensors
file. Tensor names are PEFT's:
  base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight
A is [r, in], B is [out, r].
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO

CONFIG_METADATA_KEY = "openlora.adapter_config"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALLOWED_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}
MAX_HEADER_BYTES = 16 << 20

LORA_KEY_RE = re.compile(
    r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass(frozen=True)
class LoraKey:
    layer: int
    module: str
    which: str  # "A" or "B"


def parse_lora_key(name: str) -> LoraKey | None:
    m = LORA_KEY_RE.match(name)
    return LoraKey(int(m.group(1)), m.group(2), m.group(3)) if m else None


class FormatError(ValueError):
    """The bytes are not a valid adapter; the message says why."""


def read_safetensors_header(f: BinaryIO, file_size: int) -> tuple[dict, int]:
    """Parse the header only (no tensor is loaded). Returns (header, data_start).

    Checks that the header is JSON, that every tensor's offsets are in bounds,
    contiguous, non-overlapping, and that their byte length matches dtype × shape.
    """
    raw = f.read(8)
    if len(raw) != 8:
        raise FormatError("safetensors file is truncated (no header length)")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise FormatError(f"safetensors header length {header_len} is larger than the file allows")
    try:
        header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not a JSON object")
    data_start = 8 + header_len
    data_size = file_size - data_start
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise FormatError("safetensors __metadata__ must map strings to strings")
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"tensor {name!r}: malformed header entry") from None
        if dtype not in ALLOWED_DTYPES:
            raise FormatError(f"tensor {name!r}: dtype {dtype} not allowed (float16, bfloat16, float32)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise FormatError(f"tensor {name!r}: bad shape {shape!r}")
        numel = 1
        for d in shape:
            numel *= d
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise FormatError(f"tensor {name!r}: data offsets {begin}..{end} outside the file "
                              f"({data_size} data bytes): truncated or lying header")
        if end - begin != numel * ALLOWED_DTYPES[dtype]:
            raise FormatError(f"tensor {name!r}: {end - begin} bytes for shape {shape} {dtype}")
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise FormatError(f"tensor {name!r}: data not contiguous (gap or overlap at byte {begin})")
        pos = end
    if pos != data_size:
        raise FormatError(f"safetensors data is {data_size} bytes but tensors cover {pos}")
    return header, data_start


def adapter_config_from_metadata(header: dict) -> dict:
    meta = header.get("__metadata__") or {}
    text = meta.get(CONFIG_METADATA_KEY)
    if text is None:
        raise FormatError("blob has no embedded adapter_config")
    return json.loads(text)


def lora_scaling(rank: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / (rank ** 0.5) if use_rslora else lora_alpha / rank
