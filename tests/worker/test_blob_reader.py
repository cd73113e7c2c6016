"""The one-copy safetensors reader: same tensors as safetensors' own loader, clear errors otherwise."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapter_store.canonical import write_canonical
from inference_worker import blob_reader
from inference_worker.adapter_weights import adapter_from_state_dict, load_adapter_blob
from inference_worker.blob_reader import _Entry, _groups, read_safetensors
from inference_worker.lora.staged_load import adapter_span
from services.adapter_format import read_safetensors_header

PREFIX = "base_model.model.model.layers.{}.{}.lora_{}.weight"
CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"], "peft_type": "LORA",
          "base_model_name_or_path": "tiny"}


def store_blob(tmp_path, dtype=torch.bfloat16):
    """A PEFT upload rewritten into a blob by the store's canonical writer; -> (path, tensors)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(3):
        for module, (i, o) in (("self_attn.q_proj", (64, 64)), ("mlp.down_proj", (176, 64))):
            tensors[PREFIX.format(layer, module, "A")] = torch.randn(4, i, generator=gen).to(dtype)
            tensors[PREFIX.format(layer, module, "B")] = torch.randn(o, 4, generator=gen).to(dtype)
    upload, blob = tmp_path / "upload.safetensors", tmp_path / "blob.safetensors"
    save_file(tensors, str(upload))
    with open(upload, "rb") as f:
        header, data_start = read_safetensors_header(f, upload.stat().st_size)
    write_canonical(upload, header, data_start, json.dumps(CONFIG), blob)
    return blob, tensors


def raw_file(path, header: dict, data: bytes, header_len: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)
    return path


def read_into_buffers(path):
    """The pin_memory path (copies into buffers, not views of the mapping) without pinning (needs CUDA)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, start = read_safetensors_header(f, size)
    entries = sorted((_Entry(n, blob_reader.DTYPES[i["dtype"]], i["shape"], *i["data_offsets"])
                      for n, i in header.items() if n != "__metadata__"), key=lambda e: e.begin)
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)[start:]
    return blob_reader._copy_into_buffers(data, entries, False)


def test_store_blob_loads_as_safetensors_does(tmp_path):
    blob, tensors = store_blob(tmp_path)
    meta, got = read_safetensors(blob)
    expected = load_file(str(blob))
    with safe_open(str(blob), framework="pt") as f:
        assert meta == f.metadata() and list(got) == list(f.keys())
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor) and torch.equal(got[name], tensors[name])
    weights = load_adapter_blob(blob, "k")
    assert weights.rank == 4 and weights.scaling == 2.0 and weights.base_model == "tiny"
    a, b = weights.modules[(2, "down_proj")]
    assert torch.equal(a, tensors[PREFIX.format(2, "mlp.down_proj", "A")])
    assert torch.equal(b, tensors[PREFIX.format(2, "mlp.down_proj", "B")])


def test_tensors_are_views_of_a_mapping(tmp_path):
    """Without pinning nothing is copied: every tensor views one mapping of the file."""
    blob, _ = store_blob(tmp_path)
    _, got = read_safetensors(blob)
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 1


def test_copy_into_buffers(tmp_path):
    """The pinned path's copy: a few buffers (split below powers of two), equal tensors."""
    blob, tensors = store_blob(tmp_path, torch.float32)
    got = read_into_buffers(blob)
    assert 1 < len({t.untyped_storage().data_ptr() for t in got.values()}) < len(got)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_groups_cut_at_tensors_below_a_power_of_two():
    sizes = [100, 3000, 700, 700, 5000, 20, 4096, 1]
    entries, pos = [], 0
    for i, n in enumerate(sizes):
        entries.append(_Entry(str(i), torch.uint8, [n], pos, pos + n))
        pos += n
    groups = _groups(entries)
    assert [e for g in groups for e in g] == entries
    for g in groups:
        span = g[-1].end - g[0].begin
        rounded = 1 << (span - 1).bit_length()
        assert len(g) == 1 or rounded - span < max(sizes), (span, rounded)


def test_dtypes_and_shapes_match_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "bf16": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(7, generator=gen).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=gen),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.25),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    meta, got = read_safetensors(path)
    assert meta == {"k": "v"} and set(got) == set(tensors)
    read = read_into_buffers(path)
    for name, tensor in load_file(str(path)).items():
        for mine in (got[name], read[name]):
            assert mine.dtype == tensor.dtype and mine.shape == tensor.shape, name
            assert torch.equal(mine, tensor) and torch.equal(mine, tensors[name]), name


def test_unaligned_offset_is_copied(tmp_path):
    """A hand-made file whose f32 starts at byte 2 (after one bf16): safetensors loads it, so must we."""
    value = torch.tensor([1.5, -2.0])
    header = {"h": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
              "f32": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]}}
    half = torch.tensor([0.75], dtype=torch.bfloat16)
    path = raw_file(tmp_path / "odd.safetensors", header, half.view(torch.uint8).numpy().tobytes()
                    + value.numpy().tobytes())
    for got in (read_safetensors(path)[1], read_into_buffers(path)):
        assert torch.equal(got["f32"], value) and torch.equal(got["h"], half)
        assert torch.equal(got["f32"], load_file(str(path))["f32"])


def test_truncated_file(tmp_path):
    blob, _ = store_blob(tmp_path)
    data = blob.read_bytes()
    blob.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(blob)
    blob.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(blob)


def test_header_length_beyond_the_file(tmp_path):
    path = raw_file(tmp_path / "bad.safetensors", {}, b"", header_len=1 << 40)
    with pytest.raises(ValueError, match="header length .* larger than the file"):
        read_safetensors(path)


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}, "dtype I64 not allowed"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "8 bytes for shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "outside the file"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad shape"),
    ({"dtype": "F32", "shape": [2]}, "malformed"),
])
def test_bad_entries(tmp_path, entry, match):
    path = raw_file(tmp_path / "bad.safetensors", {"t": entry}, bytes(8))
    with pytest.raises(ValueError, match=match):
        read_safetensors(path)


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(ValueError, match="not contiguous"):
        read_safetensors(raw_file(tmp_path / "bad.safetensors", header, bytes(12)))


def test_blob_without_config(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({PREFIX.format(0, "self_attn.q_proj", "A"): torch.zeros(4, 8)}, str(path), metadata={"x": "y"})
    with pytest.raises(ValueError, match="has no embedded adapter_config"):
        load_adapter_blob(path, "k")


@pytest.mark.gpu
def test_pinned_read_gives_pinned_equal_tensors(tmp_path):
    blob, _ = store_blob(tmp_path)
    expected = load_file(str(blob))
    _, got = read_safetensors(blob, pin_memory=True)
    for name, tensor in expected.items():
        assert got[name].is_pinned() and torch.equal(got[name], tensor), name
    weights = load_adapter_blob(blob, "k", pin_memory=True)
    assert all(a.is_pinned() and b.is_pinned() for a, b in weights.modules.values())
    a = weights.modules[(1, "q_proj")][0]
    assert torch.equal(a.to("cuda", non_blocking=True).cpu(), expected[PREFIX.format(1, "self_attn.q_proj", "A")])


def test_blob_in_buffers_stages_one_copy_per_buffer(tmp_path):
    """What the CPU tier holds on CUDA (a blob read into a few buffers) takes the slot pool's
    staged load: one chunk per buffer, every module found at its offset (lora/staged_load.py)."""
    blob, _ = store_blob(tmp_path)
    tensors = read_into_buffers(blob)
    weights = adapter_from_state_dict("k", CONFIG, tensors)
    span = adapter_span(weights, torch.bfloat16)
    assert span is not None
    assert len(span.chunks) == len({t.untyped_storage().data_ptr() for t in tensors.values()}) > 1
    staged = torch.cat(span.chunks)
    for key, (a, b) in weights.modules.items():
        a_off, b_off = span.offsets[key]
        assert torch.equal(staged[a_off: a_off + a.numel()].view_as(a), a)
        assert torch.equal(staged[b_off: b_off + b.numel()].view_as(b), b)
