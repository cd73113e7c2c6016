"""Byte-exact round trips through raw stubs and the client; versions, list, delete, restart."""
from __future__ import annotations

import hashlib
import json

import grpc
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from protos import adapter_store_pb2 as pb
from services.adapter_format import CONFIG_METADATA_KEY
from services.errors import NotFound
from tests.store.synthetic import dir_requests, lora_tensors, sha256_file, write_adapter


def download_raw(stub, ref: str, offset: int = 0) -> tuple:
    stream = stub.DownloadAdapter(pb.DownloadAdapterRequest(ref=ref, offset=offset), timeout=60)
    first = next(stream)
    assert first.WhichOneof("payload") == "adapter"
    chunks = [m.chunk for m in stream]
    assert all(m for m in chunks) and all(len(m) <= 1 << 20 for m in chunks)
    return first.adapter, b"".join(chunks)


def test_raw_stub_round_trip_is_byte_exact(store, tmp_path):
    src = write_adapter(tmp_path / "a", seed=1)
    requests = dir_requests("tenant/raw", src, base_model="tiny-llama")
    adapter = store.stub.UploadAdapter(iter(requests), timeout=60)
    assert (adapter.name, adapter.version, adapter.rank, adapter.lora_alpha) == ("tenant/raw", 1, 8, 16.0)
    assert list(adapter.target_modules) == ["q_proj", "v_proj"] and adapter.base_model == "tiny-llama"
    record, blob = download_raw(store.stub, "tenant/raw@1")
    assert record == adapter == store.stub.GetAdapter(pb.GetAdapterRequest(ref="tenant/raw"), timeout=10)
    assert hashlib.sha256(blob).hexdigest() == adapter.sha256 and len(blob) == adapter.size_bytes
    assert sha256_file(store.data_dir / "blobs" / adapter.sha256[:2] / adapter.sha256) == adapter.sha256
    # the blob is the uploaded safetensors plus the config in its metadata; tensors are the uploaded bytes
    (tmp_path / "blob.safetensors").write_bytes(blob)
    with safe_open(str(tmp_path / "blob.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()[CONFIG_METADATA_KEY])
    assert config["r"] == 8 and config["base_model_name_or_path"] == "tiny-llama"
    original = load_file(str(src / "adapter_model.safetensors"))
    stored = load_file(str(tmp_path / "blob.safetensors"))
    assert original.keys() == stored.keys() and all(torch.equal(original[k], stored[k]) for k in original)


def test_peft_adapter_push_pull_loads_equal(store, tmp_path, tiny_model_dir, adapter_factory):
    import transformers
    from peft import PeftModel

    src = adapter_factory(tiny_model_dir, rank=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                          seed=3)
    pushed = store.client.upload(src, "peft-adapter", base_model="tiny-llama", description="d",
                                 labels={"team": "x"})
    assert (pushed.rank, pushed.description, dict(pushed.labels)) == (4, "d", {"team": "x"})
    pulled = store.client.pull("peft-adapter", tmp_path / "pulled")
    assert pulled == pushed
    assert sha256_file(tmp_path / "pulled" / "adapter_model.safetensors") == pushed.sha256

    def load(adapter_dir):
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter_dir).eval()
    a, b = load(src), load(tmp_path / "pulled")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    # pushing the pulled directory back is the same content: the same version
    assert store.client.upload(tmp_path / "pulled", "peft-adapter") == pushed


def test_large_adapter_goes_through_in_chunks(store, tmp_path):
    """~20 MiB: 20 upload and 20 download messages. Nothing in the store depends on the size
    beyond the chunk loop, so a 200 MB adapter takes the same path (just more chunks)."""
    sizes = {"q_proj": (4096, 4096), "v_proj": (4096, 4096)}
    src = write_adapter(tmp_path / "big", tensors=lora_tensors(rank=64, num_layers=5, sizes=sizes), rank=64)
    assert (src / "adapter_model.safetensors").stat().st_size > 20 << 20
    seen = []
    adapter = store.client.upload(src, "big", progress=lambda done, total: seen.append((done, total)))
    assert len(seen) > 20 and seen[-1][0] == seen[-1][1]
    record, blob = download_raw(store.stub, "big")
    assert record == adapter and hashlib.sha256(blob).hexdigest() == adapter.sha256
    assert store.client.download("big", tmp_path / "big.safetensors") == adapter
    assert sha256_file(tmp_path / "big.safetensors") == adapter.sha256


def test_versions_idempotence_and_latest(store, tmp_path):
    one, two = write_adapter(tmp_path / "1", seed=1), write_adapter(tmp_path / "2", seed=2)
    v1 = store.client.upload(one, "model-x")
    assert store.client.upload(one, "model-x") == v1                       # identical: same version
    v2 = store.client.upload(two, "model-x")
    assert (v1.version, v2.version) == (1, 2) and v1.sha256 != v2.sha256
    assert store.client.upload(one, "model-x") == v1                       # still its content's version
    assert store.client.get("model-x") == v2 and store.client.get("model-x@1") == v1
    assert len(store.rows()) == 2 and len(store.snapshot()["blobs"]) == 2
    # the same content under another name is another adapter sharing one blob
    other = store.client.upload(one, "other-name")
    assert (other.version, other.sha256) == (1, v1.sha256) and len(store.snapshot()["blobs"]) == 2


def test_list_filters_pages_and_all_versions(store, tmp_path):
    a, b = write_adapter(tmp_path / "a", seed=1), write_adapter(tmp_path / "b", seed=2)
    for i in range(5):
        store.client.upload(a, f"t/n{i}", base_model="m1")
    store.client.upload(b, "t/n0", base_model="m1")                       # t/n0 has 2 versions
    store.client.upload(b, "u_x", base_model="m2")
    store.client.upload(a, "uxx", base_model="m2")                        # '_' in a prefix is no wildcard
    names = [(x.name, x.version) for x in store.client.list(page_size=2)]
    assert names == [("t/n0", 2), ("t/n1", 1), ("t/n2", 1), ("t/n3", 1), ("t/n4", 1), ("u_x", 1), ("uxx", 1)]
    assert len(store.client.list(all_versions=True, page_size=3)) == 8
    assert [x.name for x in store.client.list(base_model="m2")] == ["u_x", "uxx"]
    assert [x.name for x in store.client.list(name_prefix="u_")] == ["u_x"]
    assert [x.name for x in store.client.list(name_prefix="t/", base_model="m2")] == []
    page = store.stub.ListAdapters(pb.ListAdaptersRequest(page_size=3), timeout=10)
    assert len(page.adapters) == 3 and page.next_page_token
    with pytest.raises(grpc.RpcError) as err:
        store.stub.ListAdapters(pb.ListAdaptersRequest(page_token="not-a-token"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_one_version_all_versions_and_blob_refcount(store, tmp_path):
    a, b = write_adapter(tmp_path / "a", seed=1), write_adapter(tmp_path / "b", seed=2)
    v1, v2 = store.client.upload(a, "x"), store.client.upload(b, "x")
    shared = store.client.upload(a, "y")
    assert [d.version for d in store.client.delete("x@1")] == [1]
    assert store.client.get("x") == v2
    assert len(store.snapshot()["blobs"]) == 2                               # y still references a's blob
    assert [d.version for d in store.client.delete("x")] == [2]
    with pytest.raises(NotFound):
        store.client.get("x")
    with pytest.raises(NotFound):
        store.client.delete("x")
    snap = store.snapshot()
    assert snap["rows"] == [("y", 1, shared.sha256)]
    assert snap["blobs"] == [f"blobs/{v1.sha256[:2]}/{v1.sha256}"]
    store.client.delete("y")
    assert store.snapshot() == {"rows": [], "blobs": [], "tmp": []}


def test_restart_keeps_everything(store, tmp_path):
    a = store.client.upload(write_adapter(tmp_path / "a", seed=1), "keep", description="survives")
    store.restart()
    assert store.client.get("keep@1") == a
    assert store.client.download("keep", tmp_path / "out.safetensors") == a
    assert sha256_file(tmp_path / "out.safetensors") == a.sha256
    assert store.client.upload(write_adapter(tmp_path / "b", seed=2), "keep").version == 2


def test_download_resumes_from_offset(store, tmp_path):
    adapter = store.client.upload(write_adapter(tmp_path / "a", num_layers=8, seed=1), "resume-me")
    _, blob = download_raw(store.stub, "resume-me")
    half = len(blob) // 2
    assert download_raw(store.stub, "resume-me", offset=half)[1] == blob[half:]
    assert download_raw(store.stub, "resume-me", offset=len(blob))[1] == b""
    # an interrupted download left the first half in dest.part: the client fetches only the rest
    dest = tmp_path / "dl" / "adapter.safetensors"
    dest.parent.mkdir()
    dest.with_name(dest.name + ".part").write_bytes(blob[:half])
    seen = []
    assert store.client.download("resume-me", dest, progress=lambda d, t: seen.append(d)) == adapter
    assert dest.read_bytes() == blob and seen[0] > half and seen[-1] == len(blob)
    assert not dest.with_name(dest.name + ".part").exists()
    # a corrupt or foreign .part is detected by the sha256 and the download starts over
    dest.with_name(dest.name + ".part").write_bytes(b"\0" * half)
    assert store.client.download("resume-me", dest) == adapter and dest.read_bytes() == blob
    dest.with_name(dest.name + ".part").write_bytes(blob + b"extra")        # longer than the blob
    assert store.client.download("resume-me", dest) == adapter and dest.read_bytes() == blob
    with pytest.raises(grpc.RpcError) as err:
        download_raw(store.stub, "resume-me", offset=len(blob) + 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
