"""A small client of the adapter store, for the CLI and for workers.

Errors come back as services.errors exceptions (NotFound, InvalidArgument, ...).
Downloads go to `<dest>.part` first and are renamed only once the sha256 of the
whole file matches the store's, so a destination path never holds a partial or
corrupt blob; an interrupted download resumes from the `.part` file's size.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from protos import adapter_store_pb2 as pb
from protos import adapter_store_pb2_grpc, common_pb2
from services.adapter_format import adapter_config_from_metadata, read_safetensors_header
from services.channels import insecure_channel
from services.config import CHUNK_BYTES, store_address
from services.errors import InvalidArgument, OpenLoRAError, from_rpc_error

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
UNARY_TIMEOUT_S = 30.0

Progress = Callable[[int, int], None]   # (bytes done, bytes total)


class IntegrityError(OpenLoRAError):
    """Downloaded bytes do not hash to the store's sha256."""


def _upload_requests(adapter_dir: Path, header: pb.UploadHeader, progress: Progress | None) -> Iterator:
    files = [(pb.ADAPTER_FILE_CONFIG, adapter_dir / CONFIG_FILE),
             (pb.ADAPTER_FILE_WEIGHTS, adapter_dir / WEIGHTS_FILE)]
    total = sum(path.stat().st_size for _, path in files)
    done = 0
    yield pb.UploadAdapterRequest(header=header)
    for kind, path in files:
        with open(path, "rb") as f:
            while data := f.read(CHUNK_BYTES):
                yield pb.UploadAdapterRequest(chunk=pb.FileChunk(file=kind, data=data, filename=path.name))
                done += len(data)
                if progress is not None:
                    progress(done, total)


def _sha256_of(path: Path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest


def write_peft_config(blob_path: Path, out_dir: Path) -> Path:
    """Write adapter_config.json from a blob's embedded config (the blob itself is a valid
    adapter_model.safetensors: PEFT ignores the extra metadata)."""
    with open(blob_path, "rb") as f:
        header, _ = read_safetensors_header(f, blob_path.stat().st_size)
    path = out_dir / CONFIG_FILE
    path.write_text(json.dumps(adapter_config_from_metadata(header), indent=2, sort_keys=True) + "\n")
    return path


class StoreClient:
    def __init__(self, address: str | None = None, channel: grpc.Channel | None = None):
        self.address = address or store_address()
        self._channel = channel or insecure_channel(self.address)
        self._stub = adapter_store_pb2_grpc.AdapterStoreStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upload(self, adapter_dir: str | Path, name: str, *, base_model: str = "", description: str = "",
               labels: dict[str, str] | None = None, progress: Progress | None = None,
               timeout: float | None = None) -> common_pb2.Adapter:
        """Push a PEFT directory (adapter_config.json + adapter_model.safetensors)."""
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / WEIGHTS_FILE).is_file():
            pickles = [p for p in PICKLE_WEIGHTS if (adapter_dir / p).exists()]
            hint = (f"; {pickles[0]} is pickle and is refused: re-save with "
                    "save_pretrained(safe_serialization=True)") if pickles else ""
            raise InvalidArgument(f"{adapter_dir}: no {WEIGHTS_FILE}{hint}")
        if not (adapter_dir / CONFIG_FILE).is_file():
            raise InvalidArgument(f"{adapter_dir}: no {CONFIG_FILE}")
        header = pb.UploadHeader(name=name, base_model=base_model, description=description,
                                 labels=labels or {})
        try:
            return self._stub.UploadAdapter(_upload_requests(adapter_dir, header, progress), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def download(self, ref: str, dest: str | Path, *, resume: bool = True, progress: Progress | None = None,
                 timeout: float | None = None) -> common_pb2.Adapter:
        """Fetch a blob to `dest`, verified by sha256; resumes from `<dest>.part` when present."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        if not resume:
            part.unlink(missing_ok=True)
        try:
            adapter = self._download_part(ref, part, progress, timeout)
        except IntegrityError:
            # a stale .part (another version, or a corrupt byte): start over once, from zero
            adapter = self._download_part(ref, part, progress, timeout, restart=True)
        os.replace(part, dest)
        return adapter

    def _download_part(self, ref: str, part: Path, progress: Progress | None, timeout: float | None,
                       restart: bool = False) -> common_pb2.Adapter:
        if restart:
            part.unlink(missing_ok=True)
        offset = part.stat().st_size if part.exists() else 0
        digest = _sha256_of(part) if offset else hashlib.sha256()
        try:
            request = pb.DownloadAdapterRequest(ref=ref, offset=offset)
            stream = self._stub.DownloadAdapter(request, timeout=timeout)
            first = next(stream)
            adapter = first.adapter
            if offset > adapter.size_bytes:
                stream.cancel()
                raise IntegrityError(f"{part} is larger than {ref} ({adapter.size_bytes} bytes)")
            done = offset
            with open(part, "ab") as out:
                for message in stream:
                    out.write(message.chunk)
                    digest.update(message.chunk)
                    done += len(message.chunk)
                    if progress is not None:
                        progress(done, adapter.size_bytes)
                out.flush()
                os.fsync(out.fileno())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        if digest.hexdigest() != adapter.sha256 or done != adapter.size_bytes:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"download of {ref} does not match its sha256 {adapter.sha256}")
        return adapter

    def pull(self, ref: str, out_dir: str | Path, *, resume: bool = True,
             progress: Progress | None = None) -> common_pb2.Adapter:
        """Download into a PEFT directory that peft's PeftModel.from_pretrained loads."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        adapter = self.download(ref, out_dir / WEIGHTS_FILE, resume=resume, progress=progress)
        write_peft_config(out_dir / WEIGHTS_FILE, out_dir)
        return adapter

    def get(self, ref: str) -> common_pb2.Adapter:
        return self._unary(self._stub.GetAdapter, pb.GetAdapterRequest(ref=ref))

    def list(self, *, base_model: str = "", name_prefix: str = "", all_versions: bool = False,
             page_size: int = 0) -> list[common_pb2.Adapter]:
        """Every matching adapter (follows the pages)."""
        adapters, token = [], ""
        while True:
            page = self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest(
                page_size=page_size, page_token=token, base_model=base_model, name_prefix=name_prefix,
                all_versions=all_versions))
            adapters.extend(page.adapters)
            token = page.next_page_token
            if not token:
                return adapters

    def delete(self, ref: str) -> list[common_pb2.Adapter]:
        return list(self._unary(self._stub.DeleteAdapter, pb.DeleteAdapterRequest(ref=ref)).deleted)

    @staticmethod
    def _unary(method, request):
        try:
            return method(request, timeout=UNARY_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
