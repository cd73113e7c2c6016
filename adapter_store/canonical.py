"""Write the canonical blob: the uploaded safetensors with the PEFT config in its metadata.

Only the header is rewritten; tensor bytes are copied through unread (offsets are
relative to the data section, so they stay valid). The header JSON is serialized
with sorted keys and the config JSON canonically too, so identical uploads give
identical bytes and the same sha256: that is what makes a re-push idempotent, and
pushing a pulled adapter back gives the same blob.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from services.adapter_format import CONFIG_METADATA_KEY

COPY_BYTES = 1 << 20


def canonical_json(value: dict) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical_header(header: dict, config_text: str) -> bytes:
    meta = dict(header.get("__metadata__") or {})
    meta[CONFIG_METADATA_KEY] = config_text
    raw = canonical_json({**header, "__metadata__": meta}).encode()
    # safetensors writers pad the header with spaces so tensor data starts 8-byte aligned
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_canonical(src: Path, header: dict, data_start: int, config_text: str, dst: Path) -> tuple[str, int]:
    """Write header + src[data_start:] to dst, fsync it; returns (sha256 hex, size in bytes)."""
    digest = hashlib.sha256()
    head = canonical_header(header, config_text)
    size = len(head)
    with open(src, "rb") as inp, open(dst, "wb") as out:
        digest.update(head)
        out.write(head)
        inp.seek(data_start)
        while block := inp.read(COPY_BYTES):
            digest.update(block)
            out.write(block)
            size += len(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size
