"""StoreConfig: where the store keeps its index and blobs, and what it accepts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from services.config import CHUNK_BYTES

DB_URL_ENV = "OPENLORA_STORE_DB_URL"
MAX_CONFIG_BYTES = 1 << 20        # adapter_config.json is a few KB; 1 MiB is generous


@dataclass
class StoreConfig:
    data_dir: Path                                  # blobs/, tmp/ and (by default) index.sqlite live here
    db_url: str = ""                                # empty: env OPENLORA_STORE_DB_URL, else SQLite
    max_adapter_bytes: int = 1 << 30                # config + weights of one upload
    max_rank: int = 256
    chunk_bytes: int = CHUNK_BYTES                  # download chunk; far below gRPC's 4 MiB message limit
    max_config_bytes: int = MAX_CONFIG_BYTES

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.db_url:
            sqlite_path = (self.data_dir / "index.sqlite").resolve()
            self.db_url = os.environ.get(DB_URL_ENV) or f"sqlite:///{sqlite_path}"
        if not (self.db_url.startswith("sqlite") or self.db_url.startswith("postgresql")):
            raise ValueError(f"db_url must be sqlite:///… or postgresql+psycopg://…, got {self.db_url!r}")
        if self.max_adapter_bytes < 1:
            raise ValueError("max_adapter_bytes must be >= 1")
        if self.max_rank < 1:
            raise ValueError("max_rank must be >= 1")
        if not (1024 <= self.chunk_bytes <= 2 * CHUNK_BYTES):
            raise ValueError(f"chunk_bytes must be in [1 KiB, {2 * CHUNK_BYTES}]")
        if self.max_config_bytes < 1:
            raise ValueError("max_config_bytes must be >= 1")

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def tmp_dir(self) -> Path:
        # same filesystem as blobs/, so a finished blob is renamed (atomic), never copied
        return self.data_dir / "tmp"
