"""`openlora store`: run the adapter store service."""
from __future__ import annotations

import argparse

from adapter_store.config import DB_URL_ENV, StoreConfig
from adapter_store.server import build_server
from services.config import ServerConfig
from services.logging_setup import setup_logging
from services.server import serve_forever
from services.telemetry import setup_telemetry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="0.0.0.0:50052",
                        help="HOST:PORT to serve on (default %(default)s)")
    parser.add_argument("--data", default=".data/store",
                        help="data directory: blobs/, tmp/, index.sqlite (default %(default)s)")
    parser.add_argument("--db-url", default="",
                        help="SQLAlchemy URL of the index, e.g. postgresql+psycopg://user@host/db "
                        f"(default: env {DB_URL_ENV}, else SQLite in --data)")
    parser.add_argument("--max-adapter-mb", type=int, default=1024,
                        help="largest upload in MiB (default %(default)s)")
    parser.add_argument("--max-rank", type=int, default=256,
                        help="largest LoRA rank accepted (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    setup_logging("openlora-store")
    config = StoreConfig(data_dir=args.data, db_url=args.db_url, max_adapter_bytes=args.max_adapter_mb << 20,
                         max_rank=args.max_rank)
    telemetry = setup_telemetry("openlora-store")
    server, store = build_server(config, ServerConfig(listen=args.listen), telemetry)
    try:
        return serve_forever(server)
    finally:
        store.close()
        telemetry.shutdown()
