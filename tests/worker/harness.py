"""A real worker for tests (in-process, on 127.0.0.1:<free port>) and the PEFT reference."""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import grpc
import torch

from inference_worker.config import EngineConfig
from inference_worker.server import WorkerConfig, build_worker
from protos import generate_pb2, inference_worker_pb2, inference_worker_pb2_grpc
from services.channels import insecure_channel
from tests.store.harness import wait_for

RPC_TIMEOUT_S = 60.0


def engine_config(**overrides) -> EngineConfig:
    """CPU, float32, a small KV budget: fast to start, exact against the reference."""
    return EngineConfig(**{"device": "cpu", "dtype": "float32", "num_kv_blocks": 256, "max_num_seqs": 16,
                           "max_model_len": 1024, "max_lora_rank": 16, **overrides})


class WorkerHarness:
    def __init__(self, model_dir: Path, store_address: str, data_dir: Path, worker_overrides: dict | None = None,
                 **engine_overrides):
        self.worker = build_worker(WorkerConfig(
            model_dir=str(model_dir), store=store_address, listen="127.0.0.1:0", data_dir=str(data_dir),
            worker_id="test-worker", grace_s=5.0, engine=engine_config(**engine_overrides),
            **(worker_overrides or {})))
        self.worker.start()
        self.address = self.worker.server.address
        self.channel = insecure_channel(self.address)
        self.stub = inference_worker_pb2_grpc.InferenceWorkerStub(self.channel)
        self.tokenizer = self.worker.engine.tokenizer

    def stop(self) -> None:
        self.channel.close()
        self.worker.stop(grace_s=0)

    def status(self) -> inference_worker_pb2.WorkerStatus:
        return self.stub.GetStatus(inference_worker_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S)

    def wait_idle(self) -> inference_worker_pb2.WorkerStatus:
        """Bounded wait until no request runs or waits and no KV block is used."""
        def idle():
            s = self.status()
            return s if (s.running_requests, s.waiting_requests, s.kv_blocks_used) == (0, 0, 0) else None
        return wait_for(idle, "the worker to be idle")

    def generate(self, timeout: float = RPC_TIMEOUT_S, **fields) -> list[generate_pb2.GenerateResponse]:
        return list(self.stub.Generate(request(**fields), timeout=timeout))


def request(prompt=None, ids=None, adapter="", max_tokens=8, merge=None, **sampling) -> generate_pb2.GenerateRequest:
    """Greedy by default (temperature 0, EOS ignored) so tokens are comparable with the reference."""
    params = generate_pb2.SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, "ignore_eos": True,
                                                                   **sampling})
    req = generate_pb2.GenerateRequest(adapter=adapter, sampling=params)
    if merge is not None:
        req.merge.CopyFrom(merge)
    if prompt is not None:
        req.prompt = prompt
    if ids is not None:
        req.prompt_token_ids.ids.extend(ids)
    return req


def tokens_of(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


def run_concurrently(fns, timeout: float = RPC_TIMEOUT_S) -> list:
    """Call each fn in its own thread; results (or the exception raised) in order."""
    results = [None] * len(fns)

    def call(i, fn):
        try:
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc
    threads = [threading.Thread(target=call, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a concurrent call did not finish"
    return results


def code_of(result) -> grpc.StatusCode | None:
    return result.code() if isinstance(result, grpc.RpcError) else None


class StreamReader:
    """Reads a server stream in a thread into a queue, so a test can wait on it with a bound."""

    def __init__(self, call):
        self.call = call
        self.items: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for item in self.call:
                self.items.put(item)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def next(self, timeout: float = RPC_TIMEOUT_S):
        return self.items.get(timeout=timeout)

    def wait_for(self, predicate, timeout: float = RPC_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while True:
            item = self.items.get(timeout=max(0.0, deadline - time.monotonic()))
            if predicate(item):
                return item


class Reference:
    """transformers + peft, float32: greedy tokens computed step by step (no sampling)."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]):
        import transformers
        from peft import PeftModel

        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.model.eval()
        self._cache: dict = {}
        self._lock = threading.Lock()

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_tokens: int, adapter: str = "") -> list[int]:
        key = (tuple(prompt_ids), max_tokens, adapter)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._greedy(prompt_ids, max_tokens, adapter)
            return self._cache[key]

    def _greedy(self, prompt_ids, max_tokens, adapter):
        ids = torch.tensor([prompt_ids])
        out = []
        for _ in range(max_tokens):
            if adapter:
                self.model.set_adapter(adapter)
                logits = self.model(input_ids=ids).logits
            else:
                with self.model.disable_adapter():
                    logits = self.model(input_ids=ids).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return out
