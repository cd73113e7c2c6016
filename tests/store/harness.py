"""Run a real store for tests: in-process (StoreHarness) or as a subprocess (StoreProcess)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_store.config import StoreConfig
from adapter_store.server import SERVICE_NAME, build_server
from protos import adapter_store_pb2_grpc
from services.channels import insecure_channel
from services.config import ServerConfig
from services.store_client import StoreClient

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 60.0


def wait_for(predicate, what: str, timeout_s: float = WAIT_S, interval_s: float = 0.02):
    """Poll until predicate() is truthy; a bounded wait, never a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(interval_s)


def snapshot(data_dir: Path, rows) -> dict:
    """Everything a bad request must leave unchanged: rows, blob files, temp files."""
    return {
        "rows": sorted((r.name, r.version, r.sha256) for r in rows),
        "blobs": sorted(str(p.relative_to(data_dir)) for p in (data_dir / "blobs").rglob("*") if p.is_file()),
        "tmp": sorted(p.name for p in (data_dir / "tmp").iterdir()),
    }


class StoreHarness:
    """An in-process store server on 127.0.0.1:<free port>, with a raw stub and a client."""

    def __init__(self, data_dir: Path, db_url: str):
        self.data_dir, self.db_url = Path(data_dir), db_url
        self.server = self.store = self.channel = self.client = None

    def start(self, **overrides) -> StoreHarness:
        config = StoreConfig(data_dir=self.data_dir, db_url=self.db_url, **overrides)
        self.server, self.store = build_server(config, ServerConfig(listen="127.0.0.1:0", grace_s=0))
        self.server.start()
        self.server.set_serving()
        self.channel = insecure_channel(self.server.address)
        self.stub = adapter_store_pb2_grpc.AdapterStoreStub(self.channel)
        self.client = StoreClient(self.server.address, channel=self.channel)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.channel.close()
            self.server.stop(0)
            self.store.close()
            self.server = None

    def restart(self, **overrides) -> StoreHarness:
        self.stop()
        return self.start(**overrides)

    def rows(self):
        return self.store.index.list_page(all_versions=True, page_size=1000)[0]

    def snapshot(self) -> dict:
        return snapshot(self.data_dir, self.rows())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StoreProcess:
    """`openlora store` as a subprocess (for the CLI and crash tests)."""

    def __init__(self, data_dir: Path, db_url: str, log_path: Path):
        self.data_dir, self.db_url, self.log_path = Path(data_dir), db_url, Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> StoreProcess:
        self.address = f"127.0.0.1:{free_port()}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "store", "--listen", self.address, "--data",
                 str(self.data_dir), "--db-url", self.db_url], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        with insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving():
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"store exited with {self.proc.returncode}: {self.log_path.read_text()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
                    return reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    return False
            wait_for(serving, "the store subprocess to serve", interval_s=0.1)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=WAIT_S)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=WAIT_S)
