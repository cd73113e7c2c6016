"""AdapterStore gRPC servicer: protos in, store calls, protos out.

Download touches the index once (the first message); the chunks come from the open
blob file, so streaming never waits on the database.
"""
from __future__ import annotations

import functools
import inspect
from datetime import timezone

from google.protobuf.timestamp_pb2 import Timestamp

from adapter_store.db import AdapterRow
from adapter_store.names import parse_ref
from adapter_store.store import AdapterStore
from adapter_store.upload import receive_upload
from protos import adapter_store_pb2 as pb
from protos import adapter_store_pb2_grpc, common_pb2
from services.errors import InvalidArgument, grpc_errors, status_of
from services.metrics import Metrics
from services.telemetry import global_telemetry


def to_proto(row: AdapterRow) -> common_pb2.Adapter:
    created = row.created_at
    if created.tzinfo is None:       # SQLite hands back naive datetimes; they were stored as UTC
        created = created.replace(tzinfo=timezone.utc)
    ts = Timestamp()
    ts.FromDatetime(created)
    return common_pb2.Adapter(
        name=row.name, version=row.version, sha256=row.sha256, size_bytes=row.size_bytes,
        base_model=row.base_model, rank=row.rank, lora_alpha=row.lora_alpha,
        target_modules=row.target_modules, created_at=ts, description=row.description,
        labels=row.labels, use_rslora=row.use_rslora)


def _count_errors(method):
    """Count a servicer method's failures in openlora.store.errors (by RPC and status code)."""
    def count(self, exc: Exception) -> None:
        self.metrics.store_error(method.__name__, status_of(exc)[0].name)

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:
                count(self, exc)
                raise
        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            count(self, exc)
            raise
    return unary_wrapper


class AdapterStoreServicer(adapter_store_pb2_grpc.AdapterStoreServicer):
    def __init__(self, store: AdapterStore, metrics: Metrics | None = None):
        self.store = store
        self.metrics = metrics or global_telemetry().metrics

    @grpc_errors
    @_count_errors
    def UploadAdapter(self, request_iterator, context):
        with self.store.blobs.temp_file("upload-") as spool:
            received = receive_upload(request_iterator, spool, self.store.config)
            self.metrics.store_bytes("upload", len(received.config_bytes) + spool.stat().st_size,
                                     adapter=received.header.name)
            row, _ = self.store.add(received, spool)
        return to_proto(row)

    @grpc_errors
    @_count_errors
    def DownloadAdapter(self, request, context):
        row, blob = self.store.open_blob(parse_ref(request.ref))
        with blob:
            # the record first, even for a bad offset: a resuming client learns the size it overshot
            yield pb.DownloadAdapterResponse(adapter=to_proto(row))
            if request.offset > row.size_bytes:
                raise InvalidArgument(f"offset {request.offset} is past the end of {row.name}@{row.version} "
                                      f"({row.size_bytes} bytes)")
            blob.seek(request.offset)
            while chunk := blob.read(self.store.config.chunk_bytes):
                self.metrics.store_bytes("download", len(chunk), adapter=row.name)
                yield pb.DownloadAdapterResponse(chunk=chunk)

    @grpc_errors
    @_count_errors
    def GetAdapter(self, request, context):
        return to_proto(self.store.index.get(parse_ref(request.ref)))

    @grpc_errors
    @_count_errors
    def ListAdapters(self, request, context):
        rows, token = self.store.index.list_page(
            page_size=request.page_size, page_token=request.page_token, base_model=request.base_model,
            name_prefix=request.name_prefix, all_versions=request.all_versions)
        return pb.ListAdaptersResponse(adapters=[to_proto(r) for r in rows], next_page_token=token)

    @grpc_errors
    @_count_errors
    def DeleteAdapter(self, request, context):
        rows = self.store.delete(parse_ref(request.ref))
        return pb.DeleteAdapterResponse(deleted=[to_proto(r) for r in rows])
