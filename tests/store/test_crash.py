"""A store killed mid-upload (SIGKILL) restarts with no partial blob and no dangling row."""
from __future__ import annotations

import shutil
import threading

import grpc

from protos import adapter_store_pb2_grpc
from services.channels import insecure_channel
from services.store_client import StoreClient
from tests.store.harness import StoreProcess, snapshot, wait_for
from tests.store.synthetic import dir_requests, write_adapter


def process_snapshot(proc: StoreProcess) -> dict:
    with StoreClient(proc.address) as client:
        return snapshot(proc.data_dir, client.list(all_versions=True))


def test_sigkill_mid_upload_then_restart(data_dir, db_url, tmp_path):
    proc = StoreProcess(data_dir, db_url, tmp_path / "store.log").start()
    try:
        with StoreClient(proc.address) as client:
            kept = client.upload(write_adapter(tmp_path / "kept", seed=1), "kept")
        before = process_snapshot(proc)
        big = write_adapter(tmp_path / "big", seed=2, num_layers=32)
        requests = dir_requests("victim", big, chunk=16384)
        release = threading.Event()

        def stream():
            yield from requests[:6]
            release.wait(60)                          # the rest never comes: the store dies first
            yield from requests[6:]

        with insecure_channel(proc.address) as channel:
            stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
            future = stub.UploadAdapter.future(stream(), timeout=120)
            wait_for(lambda: [p for p in (data_dir / "tmp").iterdir() if p.stat().st_size > 0],
                     "the store to spool part of the upload")
            proc.kill()
            release.set()
            assert future.exception(timeout=60).code() == grpc.StatusCode.UNAVAILABLE
        assert list((data_dir / "tmp").iterdir())     # the kill left a partial temp file behind...

        # ...and, as if killed between the blob rename and the row commit, an unreferenced blob
        orphan_sha = "ab" * 32
        (data_dir / "blobs" / "ab").mkdir(exist_ok=True)
        kept_blob = data_dir / "blobs" / kept.sha256[:2] / kept.sha256
        shutil.copy(kept_blob, data_dir / "blobs" / "ab" / orphan_sha)

        proc.start()
        assert process_snapshot(proc) == before       # no partial blob, no orphan, no temp file, no row
        with StoreClient(proc.address) as client:
            assert client.get("kept") == kept
            assert client.upload(big, "victim").version == 1     # the interrupted push now goes through
        assert proc.terminate() == 0                  # SIGTERM drains and exits 0
    finally:
        proc.kill()
