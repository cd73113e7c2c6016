"""Read a safetensors file with at most one copy, into the host memory its tensors end up in.

The file is mapped (no copy, as safetensors' own loader does). Without pin_memory the tensors
are views of the mapping. With it, the data section is copied into a few page-locked buffers
and the tensors are views of those: one multi-threaded copy per buffer (84 MB in 1.7 ms on an
H200 host) where pinning each of ~450 tensors took 14.6 ms, and a single-threaded read() of
the file into page-locked memory 14 ms.

The header is parsed and checked by services.adapter_format.read_safetensors_header, the
same check the store applies to an upload (dtypes, bounds, contiguity): a malformed or
truncated file raises its FormatError, a ValueError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from services.adapter_format import read_safetensors_header

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}    # adapter_format's


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: list[int]
    begin: int                            # byte offsets into the data section
    end: int


def read_safetensors(path: str | Path,
                     pin_memory: bool = False) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """-> (__metadata__, tensors by name). pin_memory (needs CUDA): every tensor with data lies
    in page-locked memory."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, data_start = read_safetensors_header(f, size)
    entries = sorted((_Entry(name, DTYPES[info["dtype"]], info["shape"], *info["data_offsets"])
                      for name, info in header.items() if name != "__metadata__"), key=lambda e: e.begin)
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)[data_start:]
    if pin_memory:
        tensors = _copy_into_buffers(data, entries, pin_memory)
    else:
        tensors = {e.name: _view(data[e.begin:e.end], e, pin_memory) for e in entries}
    return header.get("__metadata__") or {}, dict(sorted(tensors.items()))  # safetensors' name order


def _copy_into_buffers(data: torch.Tensor, entries: list[_Entry], pin_memory: bool) -> dict[str, torch.Tensor]:
    tensors = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in entries if e.begin == e.end}
    for group in _groups([e for e in entries if e.begin < e.end]):
        lo = group[0].begin & ~7              # buffers are 8-aligned: keep the file's alignment
        buf = torch.empty(group[-1].end - lo, dtype=torch.uint8, pin_memory=pin_memory)
        buf.copy_(data[lo:group[-1].end])     # torch spreads a large copy over its threads
        for e in group:
            tensors[e.name] = _view(buf[e.begin - lo:e.end - lo], e, pin_memory)
    return tensors


def _groups(entries: list[_Entry]) -> list[list[_Entry]]:
    """Split the (sorted, non-empty) tensors into buffers of at most a power of two bytes each.

    PyTorch's pinned allocator rounds every allocation up to a power of two: one buffer for an
    84 MB adapter would hold 128 MB of page-locked memory. Cutting at tensor boundaries below the
    largest power of two that fits what is left wastes less than one tensor per buffer (a few
    buffers per adapter)."""
    groups, i = [], 0
    while i < len(entries):
        lo = entries[i].begin
        cap = 1 << max((entries[-1].end - lo).bit_length() - 1, 0)
        j = i + 1
        while j < len(entries) and entries[j].end - lo <= cap:
            j += 1
        groups.append(entries[i:j])
        i = j
    return groups


def _view(raw: torch.Tensor, e: _Entry, pin_memory: bool) -> torch.Tensor:
    # A view needs the offset aligned to the element size. Writers pad the header so offsets are
    # (the store's canonical blobs are), but safetensors accepts unaligned ones too, so copy those
    # rather than reject a file safetensors loads.
    if raw.storage_offset() % e.dtype.itemsize == 0:
        return raw.view(e.dtype).view(e.shape)
    out = torch.empty(e.shape, dtype=e.dtype, pin_memory=pin_memory)
    out.view(-1).view(torch.uint8).copy_(raw)
    return out
