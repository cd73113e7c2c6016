"""`openlora worker` as a subprocess: health, reflection, serving, SIGTERM drain with exit 0."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inference_worker.server import SERVICE_NAME
from protos import generate_pb2, inference_worker_pb2, inference_worker_pb2_grpc
from services.channels import insecure_channel
from tests.store.harness import free_port, wait_for
from tests.worker.harness import StreamReader, request, tokens_of

ROOT = Path(__file__).resolve().parents[2]


def health(channel, service=SERVICE_NAME):
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=2).status
    except grpc.RpcError:
        return None


def test_worker_cli_serves_and_drains_on_sigterm(tiny_model_dir, store, pushed, reference, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "worker", "--listen", address, "--model", str(tiny_model_dir),
             "--device", "cpu", "--dtype", "float32", "--data-dir", str(tmp_path / "data"),
             "--max-adapter-slots", "2", "--max-num-seqs", "4", "--grace-s", "60"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OPENLORA_STORE": store.server.address, "PYTHONPATH": str(ROOT)})
    channel = insecure_channel(address)
    try:
        def serving():
            assert proc.poll() is None, f"worker exited with {proc.returncode}: {log_path.read_text()}"
            return health(channel) == health_pb2.HealthCheckResponse.SERVING
        wait_for(serving, "the worker subprocess to serve", interval_s=0.1)

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                     timeout=10))
        assert SERVICE_NAME in {s.name for s in reply.list_services_response.service}

        stub = inference_worker_pb2_grpc.InferenceWorkerStub(channel)
        ids = [0, 45, 200, 17]
        messages = list(stub.Generate(request(ids=ids, adapter="qv-r4"), timeout=60))
        assert tokens_of(messages) == reference.greedy(ids, 8, "qv-r4")
        assert messages[-1].worker_id == f"{socket.gethostname()}:{port}"

        # SIGTERM mid-stream: the running request finishes, new ones are refused, exit code 0
        running = StreamReader(stub.Generate(request(ids=ids, max_tokens=1000), timeout=120))
        running.wait_for(lambda m: m.token_ids)
        proc.send_signal(signal.SIGTERM)
        def refusing():
            try:
                return stub.GetStatus(inference_worker_pb2.GetStatusRequest(), timeout=5).draining
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE
        wait_for(refusing, "the worker to drain")
        assert health(channel) != health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request(ids=ids), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert running.done.wait(120) and running.error is None, running.error
        rest = [running.items.get_nowait() for _ in range(running.items.qsize())]
        assert rest[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def test_worker_config_validates(tiny_model_dir, tmp_path):
    from inference_worker.cli import config_from_args
    from services.cli import build_parser

    args = build_parser().parse_args(["worker", "--model", str(tiny_model_dir), "--store", "127.0.0.1:1",
                                      "--cpu-cache-mb", "64", "--kv-cache-mb", "8", "--max-adapter-slots", "3"])
    config = config_from_args(args)
    assert config.cpu_cache_bytes == 64 << 20 and config.engine.kv_cache_bytes == 8 << 20
    assert config.engine.max_adapter_slots == 3 and config.listen == "0.0.0.0:50053"
    # background work: None = the device's default (on for CUDA, off on CPU; see EngineConfig)
    assert config.engine.cuda_graphs and config.engine.async_scheduling is None
    assert config.engine.adapter_load_thread is None
    on_cpu = config.engine.resolved(128)
    assert not on_cpu.async_scheduling and not on_cpu.adapter_load_thread and not on_cpu.overlap_outputs
    chosen = config_from_args(build_parser().parse_args(
        ["worker", "--model", str(tiny_model_dir), "--store", "127.0.0.1:1", "--no-cuda-graphs",
         "--async-scheduling", "--no-adapter-load-thread", "--stream-interval", "4", "--random-weights",
         "--no-warm-kernels", "--hold-prefill-steps", "2", "--no-lora-overlap", "--no-prompt-graphs"]))
    assert chosen.stream_interval == 4 and config.stream_interval == 1
    assert chosen.random_weights and not config.random_weights
    flags = chosen.engine
    assert not flags.cuda_graphs and flags.async_scheduling and flags.adapter_load_thread is False
    assert flags.warm_kernels is False and config.engine.warm_kernels is None
    assert flags.hold_prefill_steps == 2 and config.engine.hold_prefill_steps == 0
    assert not flags.lora_overlap and config.engine.lora_overlap
    assert not flags.prompt_graphs and config.engine.prompt_graphs
    for bad in (["--model", str(tmp_path)], ["--model", str(tiny_model_dir), "--listen", "nope"],
                ["--model", str(tiny_model_dir), "--max-num-seqs", "0"],
                ["--model", str(tiny_model_dir), "--stream-interval", "0"],
                ["--model", str(tiny_model_dir), "--hold-prefill-steps", "-1"]):
        with pytest.raises(ValueError):
            config_from_args(build_parser().parse_args(["worker", "--store", "127.0.0.1:1", *bad]))
