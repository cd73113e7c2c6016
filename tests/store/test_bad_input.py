"""Every bad upload is refused with the right status and a reason, and leaves the store as it was."""
from __future__ import annotations

import json
import struct
import threading

import grpc
import pytest
import torch
from safetensors.torch import save

from protos import adapter_store_pb2 as pb
from services.errors import InvalidArgument
from tests.store.harness import wait_for
from tests.store.synthetic import lora_config, lora_tensors, upload_requests, write_adapter

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def weights(tensors=None) -> bytes:
    return save(tensors if tensors is not None else lora_tensors(), metadata={"format": "pt"})


def config(**kwargs) -> bytes:
    return json.dumps(lora_config(**kwargs)).encode()


def with_header(raw: bytes, mutate) -> bytes:
    """Rewrite a safetensors header (to make it lie) and keep the data bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + raw[8 + n:]


def first_tensor(header: dict) -> dict:
    return next(v for k, v in sorted(header.items()) if k != "__metadata__")


def renamed(old: str, new: str) -> dict:
    t = lora_tensors()
    t[new] = t.pop(old)
    return t


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

# case id -> (requests, words the status message must contain)
CASES = {
    "truncated safetensors": (lambda: upload_requests("x", config(), weights()[:-100]), "outside the file"),
    "truncated header": (lambda: upload_requests("x", config(), weights()[:50]), "header length"),
    "corrupt header json": (lambda: upload_requests(
        "x", config(), struct.pack("<Q", 16) + b"{not json at all"), "not valid JSON"),
    "header lies about sizes": (lambda: upload_requests("x", config(), with_header(
        weights(), lambda h: first_tensor(h).update(shape=[8, 128]))), "bytes for shape"),
    "header offsets past end": (lambda: upload_requests("x", config(), with_header(
        weights(), lambda h: first_tensor(h).update(data_offsets=[0, 10**9]))), "outside the file"),
    "rank mismatch": (lambda: upload_requests("x", config(rank=8), weights(lora_tensors(rank=4))),
                      "does not match rank 8"),
    "A/B shape mismatch": (lambda: upload_requests("x", config(), weights(
        {**lora_tensors(), B0: torch.zeros(64, 4)})), "does not match rank"),
    "in size differs between layers": (lambda: upload_requests("x", config(), weights(
        {**lora_tensors(), A0: torch.zeros(8, 32)})), "differs from other q_proj"),
    "unknown tensor name": (lambda: upload_requests("x", config(), weights(
        {**lora_tensors(), "base_model.model.lm_head.weight": torch.zeros(4, 4)})), "unexpected tensor"),
    "module not in target_modules": (lambda: upload_requests("x", config(modules=("q_proj",)), weights()),
                                     "not in target_modules"),
    "lora_A without lora_B": (lambda: upload_requests("x", config(), weights(
        {k: v for k, v in lora_tensors().items() if k != B0})), "without its lora_B"),
    "target module without weights": (lambda: upload_requests(
        "x", config(modules=("q_proj", "v_proj", "k_proj")), weights()), "have no weights"),
    "int8 dtype": (lambda: upload_requests("x", config(), weights(
        {k: v.to(torch.int8) for k, v in lora_tensors().items()})), "not allowed"),
    "missing config": (lambda: upload_requests("x", None, weights()), "missing adapter_config.json"),
    "missing weights": (lambda: upload_requests("x", config(), None), "missing adapter_model.safetensors"),
    "config not json": (lambda: upload_requests("x", b"{'r': 8", weights()), "not valid JSON"),
    "not a LoRA config": (lambda: upload_requests("x", json.dumps(
        {**lora_config(), "peft_type": "PREFIX_TUNING"}).encode(), weights()), "not a LoRA config"),
    "rank_pattern": (lambda: upload_requests("x", config(rank_pattern={"q_proj": 4}), weights()),
                     "rank_pattern) is not supported"),
    "alpha_pattern": (lambda: upload_requests("x", config(alpha_pattern={"q_proj": 4}), weights()),
                      "alpha_pattern) is not supported"),
    "dora": (lambda: upload_requests("x", config(use_dora=True), weights()), "DoRA"),
    "regex target_modules": (lambda: upload_requests("x", json.dumps(
        {**lora_config(), "target_modules": ".*proj"}).encode(), weights()), "regex"),
    "unsupported module": (lambda: upload_requests("x", config(modules=("lm_head",)), weights()),
                           "not supported"),
    "rank over the limit": (lambda: upload_requests("x", config(rank=512), weights(lora_tensors(
        rank=512, sizes={"q_proj": (4, 4), "v_proj": (4, 4)}))),
                            "over this store's limit"),
    "pickle file": (lambda: upload_requests("x", config(), weights(), weights_filename="adapter_model.bin"),
                    "pickle"),
    "pickle .pt": (lambda: upload_requests("x", config(), weights(), weights_filename="model.pt"), "pickle"),
    "oversize upload": (lambda: upload_requests(
        "x", config(), weights(lora_tensors(num_layers=64)), chunk=4096), "larger than this store's limit"),
    "bad name: dot dot": (lambda: upload_requests("a/..b", config(), weights()), "bad adapter name"),
    "bad name: path": (lambda: upload_requests("../../etc/passwd", config(), weights()), "bad adapter name"),
    "bad name: two slashes": (lambda: upload_requests("a/b/c", config(), weights()), "bad adapter name"),
    "bad name: upper-case tenant": (lambda: upload_requests("Tenant/x", config(), weights()),
                                    "bad adapter name"),
    "bad name: empty": (lambda: upload_requests("", config(), weights()), "bad adapter name"),
    "bad name: space": (lambda: upload_requests("a b", config(), weights()), "bad adapter name"),
    "chunks without header": (lambda: upload_requests("x", config(), weights(), header=False),
                              "must be the header"),
    "empty stream": (list, "first message must be the header"),
    "two headers": (lambda: upload_requests("x", config(), weights()) + upload_requests("x", None, None),
                    "only one header"),
    "chunk without file kind": (lambda: upload_requests("x", None, None) + [pb.UploadAdapterRequest(
        chunk=pb.FileChunk(data=b"x"))], "without a file kind"),
    "unknown base model": (lambda: upload_requests("x", json.dumps(
        {**lora_config(), "base_model_name_or_path": None}).encode(), weights()), "base model unknown"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_is_refused_and_store_unchanged(store, tmp_path, case):
    store.restart(max_adapter_bytes=200_000)         # small limit for "oversize upload"
    store.client.upload(write_adapter(tmp_path / "ok"), "existing")
    before = store.snapshot()
    make_requests, reason = CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        store.stub.UploadAdapter(iter(make_requests()), timeout=60)
    assert err.value.code() == INVALID, err.value.details()
    assert reason in err.value.details()
    assert store.snapshot() == before


def test_client_cancel_mid_upload_leaves_nothing(store, tmp_path):
    before = store.snapshot()
    release = threading.Event()
    first = upload_requests("cancelled", config(), weights(lora_tensors(num_layers=16)), chunk=4096)

    def requests():
        yield from first[:5]
        release.wait(60)                              # hold the stream open, mid-upload

    future = store.stub.UploadAdapter.future(requests(), timeout=120)
    def spooled():
        return [p for p in (store.data_dir / "tmp").iterdir() if p.stat().st_size > 0]
    wait_for(spooled, "the server to spool the first chunks")
    future.cancel()
    release.set()
    assert future.cancelled() or future.exception().code() == grpc.StatusCode.CANCELLED
    wait_for(lambda: store.snapshot() == before, "the server to drop the cancelled upload's temp files")


def test_bad_refs(store, tmp_path):
    store.client.upload(write_adapter(tmp_path / "a"), "there")
    for ref, code in [("missing", grpc.StatusCode.NOT_FOUND), ("there@2", grpc.StatusCode.NOT_FOUND),
                      ("there@0", INVALID), ("there@x", INVALID), ("there@", INVALID), ("../x", INVALID),
                      ("there@1@1", INVALID), ("there@²", INVALID)]:
        for call in (lambda r: store.stub.GetAdapter(pb.GetAdapterRequest(ref=r), timeout=10),
                     lambda r: list(store.stub.DownloadAdapter(pb.DownloadAdapterRequest(ref=r), timeout=10)),
                     lambda r: store.stub.DeleteAdapter(pb.DeleteAdapterRequest(ref=r), timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call(ref)
            assert err.value.code() == code, (ref, err.value.details())


def test_client_refuses_pickle_dir_locally(store, tmp_path):
    d = write_adapter(tmp_path / "p")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(InvalidArgument, match="pickle"):
        store.client.upload(d, "pickled")
