"""Workers from a static list or DNS, re-resolved so scale up/down is seen."""
from __future__ import annotations

import socket

import grpc
import pytest

from protos import generate_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.discovery import Discovery, parse_workers, resolve_dns
from router.server import RouterServer
from tests.router.conftest import FAST, healthy, start_router, wait_for
from tests.router.fake_worker import FakeWorker


def test_parse_workers():
    assert parse_workers("a:1, b:2,a:1").static == ("a:1", "b:2")
    spec = parse_workers("dns:///workers.default.svc:50053")
    assert spec.is_dns and (spec.dns_host, spec.dns_port) == ("workers.default.svc", 50053)
    assert parse_workers("").static == ()
    for bad in ("a", "a:x", "dns:///noport", ":1", "a:70000"):
        with pytest.raises(ValueError):
            parse_workers(bad)
    with pytest.raises(ValueError):
        RouterConfig(workers="a:1", load_factor=0.9)


def test_resolve_dns_formats_ipv6():
    assert resolve_dns("127.0.0.1", 5) == ["127.0.0.1:5"]
    try:
        socket.getaddrinfo("::1", 5)
    except OSError:
        pytest.skip("no IPv6")
    assert resolve_dns("::1", 5) == ["[::1]:5"]


def test_failed_resolution_keeps_the_last_set():
    answers = [["10.0.0.1:1"], OSError("SERVFAIL"), ["10.0.0.2:1"]]
    seen = []

    def resolver(host, port):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    d = Discovery(parse_workers("dns:///w:1"), seen.append, resolver=resolver)
    for _ in range(3):
        d.refresh()
    assert seen == [["10.0.0.1:1"], ["10.0.0.2:1"]]


def test_dns_name_localhost():
    fake = FakeWorker("dns-w").start()
    router = start_router(f"dns:///localhost:{fake.port}")
    try:
        with grpc.insecure_channel(router.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            wait_for(lambda: f"127.0.0.1:{fake.port}" in healthy(stub), what="worker found through DNS")
            out = list(stub.Generate(generate_pb2.GenerateRequest(prompt="hi"), timeout=30))
            assert {m.worker_id for m in out} == {"dns-w"}
    finally:
        router.stop(0)
        fake.stop()


def test_dns_re_resolution_sees_scale_up_and_down():
    fakes = [FakeWorker("s0").start(), FakeWorker("s1").start()]
    answer = [fakes[0].address]
    router = RouterServer(RouterConfig(listen="127.0.0.1:0", workers="dns:///workers:1", resolve_interval_s=0.05,
                                       **FAST), resolver=lambda host, port: list(answer))
    router.start()
    try:
        with grpc.insecure_channel(router.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            wait_for(lambda: healthy(stub) == {fakes[0].address}, what="one worker")
            answer.append(fakes[1].address)
            wait_for(lambda: healthy(stub) == {f.address for f in fakes}, what="scale up seen")
            answer.remove(fakes[0].address)
            wait_for(lambda: healthy(stub) == {fakes[1].address}, what="scale down seen")
            out = list(stub.Generate(generate_pb2.GenerateRequest(prompt="hi"), timeout=30))
            assert {m.worker_id for m in out} == {"s1"}
    finally:
        router.stop(0)
        for f in fakes:
            f.stop()
