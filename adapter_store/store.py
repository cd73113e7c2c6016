"""The store: index rows and blob files kept consistent.

Order of writes, so a crash at any point leaves a consistent store (plus, at worst,
an unreferenced blob that startup cleanup removes):
  add:    blob fsynced and renamed into place -> row committed
  delete: row deleted and committed -> blob unlinked if no row references it
One process lock serializes those two, so a delete never unlinks a blob that an
upload of the same content is about to reference. Reads take no lock.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import BinaryIO

from adapter_store.blobs import BlobStore
from adapter_store.canonical import canonical_json, write_canonical
from adapter_store.config import StoreConfig
from adapter_store.db import AdapterRow
from adapter_store.index import AdapterIndex, NewAdapter
from adapter_store.names import Ref
from adapter_store.upload import ReceivedUpload
from adapter_store.validate import validate_adapter
from services.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)


class AdapterStore:
    def __init__(self, config: StoreConfig):
        self.config = config
        self.blobs = BlobStore(config.blobs_dir, config.tmp_dir)
        self.index = AdapterIndex(config.db_url)
        self._lock = threading.Lock()
        self.blobs.cleanup(self.index.referenced_sha256())

    def close(self) -> None:
        self.index.close()

    def add(self, upload: ReceivedUpload, weights_path: Path) -> tuple[AdapterRow, bool]:
        """Validate a received upload, write its canonical blob, index it. Returns (row, created)."""
        adapter = validate_adapter(upload.config_bytes, weights_path, self.config.max_rank)
        base_model = upload.header.base_model or adapter.base_model
        if not base_model:
            raise InvalidArgument("base model unknown: adapter_config.json has no base_model_name_or_path; "
                                  "pass one with the upload (--base-model)")
        # the blob's config names the base model the index records, so the two never disagree
        config_text = canonical_json({**adapter.config, "base_model_name_or_path": base_model})
        with self.blobs.temp_file("blob-") as blob_tmp:
            sha256, size = write_canonical(weights_path, adapter.header, adapter.data_start, config_text,
                                           blob_tmp)
            new = NewAdapter(name=upload.header.name, sha256=sha256, size_bytes=size, base_model=base_model,
                             rank=adapter.rank, lora_alpha=adapter.lora_alpha, use_rslora=adapter.use_rslora,
                             target_modules=adapter.target_modules, description=upload.header.description,
                             labels=dict(upload.header.labels))
            with self._lock:
                placed = self.blobs.place(blob_tmp, sha256)
                try:
                    row, created = self.index.add(new)
                except BaseException:
                    if placed and not self.index.is_referenced(sha256):
                        self.blobs.remove(sha256)
                    raise
        log.info("%s %s@%d sha256=%s size=%d", "added" if created else "exists", row.name, row.version,
                 sha256, size)
        return row, created

    def open_blob(self, ref: Ref) -> tuple[AdapterRow, BinaryIO]:
        """The row and its blob opened for reading. An open file stays readable even if a
        concurrent delete unlinks it, so a started download always completes."""
        row = self.index.get(ref)
        try:
            return row, open(self.blobs.path(row.sha256), "rb")
        except FileNotFoundError:
            raise NotFound(f"adapter {ref} was deleted") from None

    def delete(self, ref: Ref) -> list[AdapterRow]:
        with self._lock:
            rows = self.index.delete(ref)
            for sha256 in {row.sha256 for row in rows}:
                if not self.index.is_referenced(sha256):
                    self.blobs.remove(sha256)
        log.info("deleted %s", ", ".join(f"{r.name}@{r.version}" for r in rows))
        return rows
