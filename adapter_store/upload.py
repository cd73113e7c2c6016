"""Receive an upload stream: the header first, then chunks of the two PEFT files.

The weights are spooled to a temp file (never held in memory); the config, small,
is kept in memory. Limits are enforced while streaming, so an oversize upload is
refused before it is all on disk. A client that cancels makes the request iterator
raise; the caller's temp files are removed on the way out.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapter_store.config import StoreConfig
from adapter_store.names import check_name
from adapter_store.validate import check_filename
from protos import adapter_store_pb2 as pb
from services.errors import InvalidArgument

MAX_DESCRIPTION_CHARS = 4096
MAX_LABELS = 64
MAX_LABEL_CHARS = 256
MAX_BASE_MODEL_CHARS = 512


@dataclass
class ReceivedUpload:
    header: pb.UploadHeader
    config_bytes: bytes           # adapter_config.json as sent; the weights are in the spool file


def check_header(header: pb.UploadHeader) -> None:
    check_name(header.name)
    if len(header.base_model) > MAX_BASE_MODEL_CHARS:
        raise InvalidArgument(f"base_model is longer than {MAX_BASE_MODEL_CHARS} characters")
    if len(header.description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument(f"description is longer than {MAX_DESCRIPTION_CHARS} characters")
    if len(header.labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels")
    for key, value in header.labels.items():
        if not key or len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"label {key!r}: keys must be non-empty; keys and values at most "
                                  f"{MAX_LABEL_CHARS} characters")


def receive_upload(requests: Iterator[pb.UploadAdapterRequest], weights_path: Path,
                   config: StoreConfig) -> ReceivedUpload:
    first = next(requests, None)
    if first is None:
        raise InvalidArgument("empty upload: the first message must be the header")
    if first.WhichOneof("payload") != "header":
        raise InvalidArgument("the first upload message must be the header (name, base model), not a chunk")
    header = first.header
    check_header(header)
    config_parts: list[bytes] = []
    num_config = num_weights = 0
    with open(weights_path, "wb") as weights:
        for request in requests:
            if request.WhichOneof("payload") != "chunk":
                raise InvalidArgument("only one header per upload; the rest must be chunks")
            chunk = request.chunk
            if num_config + num_weights + len(chunk.data) > config.max_adapter_bytes:
                raise InvalidArgument(
                    f"upload is larger than this store's limit of {config.max_adapter_bytes} bytes")
            if chunk.file == pb.ADAPTER_FILE_CONFIG:
                check_filename(chunk.filename, ".json")
                num_config += len(chunk.data)
                if num_config > config.max_config_bytes:
                    raise InvalidArgument(
                        f"adapter_config.json is larger than {config.max_config_bytes} bytes")
                config_parts.append(chunk.data)
            elif chunk.file == pb.ADAPTER_FILE_WEIGHTS:
                check_filename(chunk.filename, ".safetensors")
                num_weights += len(chunk.data)
                weights.write(chunk.data)
            else:
                raise InvalidArgument(
                    "chunk without a file kind (ADAPTER_FILE_CONFIG or ADAPTER_FILE_WEIGHTS)")
    if not config_parts:
        raise InvalidArgument("missing adapter_config.json")
    if num_weights == 0:
        raise InvalidArgument("missing adapter_model.safetensors")
    return ReceivedUpload(header, b"".join(config_parts))
