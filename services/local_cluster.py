"""Store, workers and a router as local subprocesses: `openlora up`, the demo and e2e tests.

The embedded default: SQLite index and blobs under the data dir, a tiny model made
with init_model when none is given, the device the worker finds. Each process
logs to <data>/logs/<name>.log. Stopping sends SIGTERM (the services drain), waits,
then SIGKILLs what is left, so nothing outlives the cluster.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.cli import DIE_WITH_PARENT_ENV
from services.config import DEFAULT_ROUTER, DEFAULT_STORE, DEFAULT_WORKER
from services.healthcheck import check

_ROOT = Path(__file__).resolve().parents[1]   # so `python -m services.cli` works without an install


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalClusterConfig:
    data_dir: Path
    model_dir: Path | None = None           # None: <data_dir>/model, made on first start
    num_workers: int = 1
    router_port: int = _port_of(DEFAULT_ROUTER)   # 0: any free port
    store_port: int = _port_of(DEFAULT_STORE)
    worker_port: int = _port_of(DEFAULT_WORKER)   # first worker's; the next ones follow it
    worker_args: tuple[str, ...] = ()       # extra `openlora worker` flags for every worker
    start_timeout_s: float = 300.0          # per process, until grpc.health says SERVING
    stop_timeout_s: float = 30.0            # SIGTERM -> SIGKILL

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if self.model_dir is not None:
            self.model_dir = Path(self.model_dir).resolve()
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        for name in ("router_port", "store_port", "worker_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 0..65535")
        if self.start_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")


class LocalCluster:
    def __init__(self, config: LocalClusterConfig):
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}
        self.store_address = f"127.0.0.1:{config.store_port or free_port()}"
        self.worker_addresses = [f"127.0.0.1:{config.worker_port + i if config.worker_port else free_port()}"
                                 for i in range(config.num_workers)]
        self.router_address = f"127.0.0.1:{config.router_port or free_port()}"
        self.model_dir = config.model_dir or config.data_dir / "model"

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> LocalCluster:
        try:
            self._ensure_model()
            self._spawn("store", "store", "--listen", self.store_address, "--data", str(self.config.data_dir / "store"))
            self.wait_serving("store")
            for i in range(self.config.num_workers):      # all spawned first: model loads overlap
                self._spawn_worker(i)
            for i in range(self.config.num_workers):
                self.wait_serving(f"worker-{i}")
            self.start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, i: int) -> None:
        self._spawn_worker(i)
        self.wait_serving(f"worker-{i}")

    def _spawn_worker(self, i: int) -> None:
        self._spawn(f"worker-{i}", "worker", "--listen", self.worker_addresses[i], "--model", str(self.model_dir),
                    "--store", self.store_address, "--worker-id", f"worker-{i}",
                    "--data-dir", str(self.config.data_dir / f"worker-{i}"), *self.config.worker_args)

    def start_router(self) -> None:
        self._spawn("router", "router", "--listen", self.router_address, "--workers", ",".join(self.worker_addresses))
        self.wait_serving("router")

    def kill(self, name: str) -> None:
        """SIGKILL: a crash, not a drain."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        """SIGTERM everything (router first, so it stops taking requests), wait, SIGKILL the rest."""
        order = sorted(self.procs, key=lambda n: (n != "router", n == "store"))
        for name in order:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        for name in order:
            proc = self.procs.pop(name)
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalCluster:  # noqa: PYI034 (Self needs Python 3.11)
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- helpers -------------------------------------------------------------
    def address_of(self, name: str) -> str:
        if name == "store":
            return self.store_address
        if name == "router":
            return self.router_address
        return self.worker_addresses[int(name.rpartition("-")[2])]

    def log_path(self, name: str) -> Path:
        return self.config.data_dir / "logs" / f"{name}.log"

    def wait_serving(self, name: str) -> None:
        proc, address = self.procs[name], self.address_of(name)
        deadline = time.monotonic() + self.config.start_timeout_s
        while check(address, timeout_s=1.0) != "SERVING":
            if proc.poll() is not None:
                tail = self.log_path(name).read_text()[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}; log tail:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} at {address} not SERVING after {self.config.start_timeout_s}s")
            time.sleep(0.2)

    def _ensure_model(self) -> None:
        if (self.model_dir / "config.json").exists():
            return
        from services.tiny_model import init_model

        init_model(self.model_dir)

    def _spawn(self, name: str, *args: str) -> None:
        """Start `openlora <args>`. Call from the main thread: on Linux the child gets SIGTERM
        when the thread that spawned it dies, so a killed parent leaves no orphans."""
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        # the child asks Linux to SIGTERM it when we die (services/cli.py reads this): done by
        # the child itself, since a preexec_fn can deadlock a fork from a threaded parent
        env = {**os.environ, "PYTHONUNBUFFERED": "1", DIE_WITH_PARENT_ENV: str(os.getpid()),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path(name), "ab") as log:
            # own session: a terminal's Ctrl-C reaches only us, and we stop them in order
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=env,
                                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
