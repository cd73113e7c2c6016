"""compose.yaml's own commands and environment, run as local processes, serve a request.

Each service of the default profile that runs our image becomes a subprocess of
`openlora` with exactly its compose `command:` and `environment:`, translated as a
container host would: service names and 0.0.0.0 -> 127.0.0.1 (each listen port
mapped to a free one), named volumes -> temp dirs, the PostgreSQL URL ->
OPENLORA_TEST_PG_URL or SQLite, and `--device cuda` -> cpu without a GPU. Started in
depends_on order, each waited on with its healthcheck, then an adapter is pushed and
requests go through the router.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos import generate_pb2, router_pb2_grpc
from services.healthcheck import check
from tests.deploy import checks
from tests.deploy.util import free_port, wait_until
from tests.helpers import fresh_pg_schema, make_adapter

SERVICES = ("store", "worker", "router")
pytestmark = [
    pytest.mark.skipif(any(checks.is_placeholder(s) for s in SERVICES),
                       reason="needs the real store, worker and router CLIs (one still says 'not implemented yet')"),
    pytest.mark.timeout(300),
]
START_TIMEOUT_S = 120  # bounded waits; a healthy run takes a fraction of it


@dataclass
class LocalService:
    name: str
    args: list[str]
    env: dict[str, str]
    address: str | None          # where its gRPC server listens; None for a one-shot
    one_shot: bool


def _start_order(compose: dict, names: list[str]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in compose["services"][name].get("depends_on") or {}:
                if dep in names:
                    visit(dep)
            order.append(name)
    for name in names:
        visit(name)
    return order


def local_plan(compose: dict, tmp: Path, has_gpu: bool, db_url: str) -> list[LocalService]:
    """Translate compose.yaml into local processes (see the module docstring)."""
    services = compose["services"]
    commands = {n: a for n, a in checks.compose_commands(compose).items() if not services[n].get("profiles")}
    ports = {n: free_port() for n, a in commands.items() if "--listen" in a}
    rewrites: list[tuple[str, str]] = []  # (pattern, replacement), applied to every arg and env value
    aliases = checks.network_names(services)
    for name, port in ports.items():
        listen = checks.flag_value(commands[name], "--listen").rpartition(":")[2]
        for host in (*aliases[name], "0.0.0.0"):
            rewrites.append((rf"(?<![\w.-]){re.escape(host)}:{listen}\b", f"127.0.0.1:{port}"))
    for name in commands:
        for mount in services[name].get("volumes") or []:
            volume, target = mount.split(":")[:2]
            rewrites.append((rf"^{re.escape(target)}(?=/|$)", str(tmp / "volumes" / volume)))

    def translate(value: str) -> str:
        if value.startswith("postgresql"):
            return db_url
        for pattern, replacement in rewrites:
            value = re.sub(pattern, replacement, value)
        return value

    plan = []
    for name in _start_order(compose, list(commands)):
        args = [translate(a) for a in commands[name]]
        if not has_gpu and checks.flag_value(args, "--device") == "cuda":
            args[args.index("--device") + 1] = "cpu"
        env = {k: translate(checks.interpolate(str(v))) for k, v in (services[name].get("environment") or {}).items()}
        if "OPENLORA_METRICS_PORT" in env:
            env["OPENLORA_METRICS_PORT"] = str(free_port())
        address = f"127.0.0.1:{ports[name]}" if name in ports else None
        plan.append(LocalService(name, args, env, address, services[name].get("restart") == "no"))
    return plan


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENLORA_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checks.ROOT), env.get("PYTHONPATH")]))
    return env


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class Processes:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.running: list[subprocess.Popen] = []

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def run(self, svc: LocalService) -> None:
        cmd = [sys.executable, "-m", "services.cli", *svc.args]
        with open(self.log(svc.name), "wb") as out:
            if svc.one_shot:
                done = subprocess.run(cmd, check=False, env={**_base_env(), **svc.env}, cwd=self.tmp, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S)
                assert done.returncode == 0, f"{svc.name} exited {done.returncode}:\n{_tail(self.log(svc.name))}"
                return
            proc = subprocess.Popen(cmd, env={**_base_env(), **svc.env}, cwd=self.tmp, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.running.append(proc)
        healthy = wait_until(lambda: proc.poll() is not None or check(svc.address, timeout_s=1) == "SERVING",
                             timeout_s=START_TIMEOUT_S, interval_s=0.2)
        assert healthy and proc.poll() is None, f"{svc.name} not healthy:\n{_tail(self.log(svc.name))}"

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            proc.terminate()
        for proc in reversed(self.running):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _generate(router: str, adapter: str) -> list:
    request = generate_pb2.GenerateRequest(prompt="The quick brown fox", adapter=adapter,
                                           sampling=generate_pb2.SamplingParams(max_tokens=4, temperature=0.0))
    with grpc.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        replies: list = []

        def attempt() -> bool:  # the router may still be discovering the worker
            try:
                replies[:] = list(stub.Generate(request, timeout=60))
                return True
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False
        assert wait_until(attempt, timeout_s=60, interval_s=0.5), "router stayed UNAVAILABLE"
    return replies


@pytest.fixture
def db_url(tmp_path):
    """PostgreSQL as in compose when the CI's server is there (a fresh schema), else SQLite."""
    base = os.environ.get("OPENLORA_TEST_PG_URL")
    if not base:
        yield f"sqlite:///{tmp_path / 'index.sqlite'}"
        return
    with fresh_pg_schema(base, "compose") as url:
        yield url


def test_compose_commands_serve_a_request(tmp_path, db_url):
    import torch

    compose = checks.load_compose()
    plan = local_plan(compose, tmp_path, torch.cuda.is_available(), db_url)
    assert [s.args[0] for s in plan if not s.one_shot] == ["store", "worker", "router"]
    by_name = {s.args[0]: s for s in plan}
    model_dir = Path(checks.flag_value(by_name["worker"].args, "--model"))
    procs = Processes(tmp_path)
    with ThreadPoolExecutor(1) as pool:
        try:
            adapter = None
            for svc in plan:
                procs.run(svc)
                if svc.one_shot and adapter is None:  # the model exists: make an adapter of it meanwhile
                    adapter = pool.submit(make_adapter, model_dir, tmp_path / "adapter", seed=1)
            _push_and_generate(by_name, adapter.result(timeout=START_TIMEOUT_S), tmp_path)
        finally:
            procs.stop_all()


def _push_and_generate(by_name: dict[str, LocalService], adapter: Path, tmp_path: Path) -> None:
    push = subprocess.run([sys.executable, "-m", "services.cli", "adapters", "--store", by_name["store"].address,
                           "push", str(adapter), "--name", "compose-demo"], check=False,
                          env=_base_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert push.returncode == 0, push.stderr
    for name in ("", "compose-demo"):
        replies = _generate(by_name["router"].address, name)
        assert replies and replies[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
        assert sum(len(r.token_ids) for r in replies) > 0
