"""services/errors.py: our errors become the right status; context.abort() passes through."""
from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.errors import NotFound, ResourceExhausted, grpc_errors


class _Health(health_pb2_grpc.HealthServicer):
    """Check: maps by service name; Watch: a stream that fails after one message."""

    @grpc_errors
    def Check(self, request, context):
        if request.service == "missing":
            raise NotFound("no such thing")
        if request.service == "abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "aborted by hand")
        if request.service == "boom":
            raise RuntimeError("bug")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    @grpc_errors
    def Watch(self, request, context):
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        raise ResourceExhausted("queue full")


@pytest.fixture(scope="module")
def stub():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(_Health(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield health_pb2_grpc.HealthStub(channel)
    server.stop(0)


@pytest.mark.parametrize("service,code,text", [
    ("missing", grpc.StatusCode.NOT_FOUND, "no such thing"),
    ("abort", grpc.StatusCode.PERMISSION_DENIED, "aborted by hand"),
    ("boom", grpc.StatusCode.INTERNAL, "RuntimeError: bug"),
])
def test_unary_status(stub, service, code, text):
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert err.value.code() == code and text in err.value.details()


def test_stream_status_after_messages(stub):
    stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        next(stream)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in err.value.details()
