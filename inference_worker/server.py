"""Assemble a worker: engine + adapter tiers + gRPC servicer behind the shared GrpcServer."""
from __future__ import annotations

import logging
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference_worker.adapter_checks import ModelShapes, base_model_name
from inference_worker.adapter_manager import AdapterManager, ManagerConfig
from inference_worker.config import EngineConfig
from inference_worker.gc_freeze import freeze_startup_objects, unfreeze
from inference_worker.observe import EngineMonitor
from inference_worker.service import InferenceWorkerServicer
from protos import inference_worker_pb2, inference_worker_pb2_grpc
from services.channels import insecure_channel
from services.config import DEFAULT_WORKER, ServerConfig, store_address
from services.server import GrpcServer
from services.store_client import StoreClient
from services.telemetry import Telemetry, global_telemetry

log = logging.getLogger(__name__)

SERVICE_NAME = inference_worker_pb2.DESCRIPTOR.services_by_name["InferenceWorker"].full_name
DEFAULT_LISTEN = "0.0.0.0:" + DEFAULT_WORKER.rpartition(":")[2]


@dataclass
class WorkerConfig:
    model_dir: str
    store: str = field(default_factory=store_address)     # adapter store HOST:PORT
    listen: str = DEFAULT_LISTEN
    worker_id: str = ""                   # default hostname:port
    base_model: str = ""                  # default: config.json's _name_or_path, else the model dir's name
    data_dir: str = ""                    # disk cache; default .data/worker-<port> (one dir per worker)
    cpu_cache_bytes: int = 4 << 30
    disk_cache_bytes: int = 50 << 30
    grace_s: float = 10.0                 # drain: running requests get this long to finish
    stream_interval: int = 1              # tokens per streamed message (the first and last go at once)
    random_weights: bool = False          # benchmarks: weights drawn on the device from config.json alone
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"model_dir {self.model_dir!r} has no config.json")
        self.server_config()              # validates listen and grace_s
        ServerConfig(self.store)          # validates the store address
        if self.cpu_cache_bytes < 0 or self.disk_cache_bytes < 0:
            raise ValueError("cache budgets must be >= 0")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1 token")

    def server_config(self) -> ServerConfig:
        return ServerConfig(self.listen, grace_s=self.grace_s)

    def resolved_data_dir(self) -> str:
        if self.data_dir:
            return self.data_dir
        port = self.listen.rpartition(":")[2]
        if port == "0":                   # an ephemeral worker (tests): a private dir
            return tempfile.mkdtemp(prefix="openlora-worker-")
        return f".data/worker-{port}"


@dataclass
class Worker:
    config: WorkerConfig
    server: GrpcServer
    engine: object                        # inference_worker.engine.LLMEngine
    manager: AdapterManager
    servicer: InferenceWorkerServicer
    store: StoreClient
    monitor: EngineMonitor                # engine gauges and slot evictions

    def start(self) -> int:
        """Start the engine, bind, then report SERVING. Returns the port."""
        self.engine.start()
        self.monitor.start()
        port = self.server.start()
        self.servicer.address = self.server.address
        self.servicer.worker_id = self.config.worker_id or f"{socket.gethostname()}:{port}"
        self.server.set_serving()
        return port

    def stop(self, grace_s: float | None = None) -> None:
        """Drain (refuse new work, let running requests finish), then stop the engine."""
        self.server.drain(grace_s)
        self.monitor.stop()
        self.engine.stop()
        self.manager.close()
        self.store.close()

    def serve_forever(self) -> int:
        """CLI entry: serve until SIGTERM/SIGINT, drain, exit code 0."""
        self.server.install_signal_handlers()
        freeze_startup_objects()          # the worker's process is ours: full GC passes stay short
        try:
            self.start()
            self.server.wait()
            self.stop()
        finally:
            unfreeze()
        return 0


def build_worker(config: WorkerConfig, telemetry: Telemetry | None = None) -> Worker:
    """telemetry: None uses the process's global providers (set up by the CLI)."""
    from inference_worker.engine import LLMEngine

    telemetry = telemetry or global_telemetry()
    base_model = base_model_name(config.model_dir, config.base_model)
    device = config.engine.torch_device
    # adapter fetches call the store under the request's trace
    store = StoreClient(config.store, channel=telemetry.traced_channel(insecure_channel(config.store)))
    manager = AdapterManager(ManagerConfig(
        base_model=base_model, data_dir=config.resolved_data_dir(), cpu_cache_bytes=config.cpu_cache_bytes,
        disk_cache_bytes=config.disk_cache_bytes, max_lora_rank=config.engine.max_lora_rank,
        pin_memory=device.type == "cuda", merge_device=str(device)),
        store, ModelShapes.from_model_dir(config.model_dir), telemetry)
    try:
        engine = LLMEngine(config.engine, config.model_dir, manager, random_weights=config.random_weights)
    except BaseException:
        manager.close()
        store.close()
        raise
    servicer = InferenceWorkerServicer(engine, manager, worker_id=config.worker_id, base_model=base_model,
                                       device=_device_name(device), telemetry=telemetry,
                                       stream_interval=config.stream_interval)
    server = GrpcServer(config.server_config(),
                        [(inference_worker_pb2_grpc.add_InferenceWorkerServicer_to_server, servicer)],
                        [SERVICE_NAME], interceptors=[telemetry.server_interceptor()], intake=servicer.intake)
    log.info("worker for %s (base model %r) on %s", config.model_dir, base_model, config.engine.torch_device)
    return Worker(config, server, engine, manager, servicer, store, EngineMonitor(engine, telemetry.metrics))


def _device_name(device: torch.device) -> str:
    """"cpu", "cuda:0": what WorkerStatus reports."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)
