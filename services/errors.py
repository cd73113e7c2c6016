"""One place that maps OpenLoRA errors to gRPC status codes.

Service code raises these; `grpc_errors` (a servicer-method decorator) turns them
into the right status with the message as details. Anything else is INTERNAL.
"""
from __future__ import annotations

import functools
import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class OpenLoRAError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(OpenLoRAError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(OpenLoRAError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class AlreadyExists(OpenLoRAError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(OpenLoRAError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(OpenLoRAError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(OpenLoRAError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(OpenLoRAError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(OpenLoRAError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, OpenLoRAError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def from_rpc_error(exc: grpc.RpcError) -> OpenLoRAError:
    """The inverse mapping, for clients that re-raise a peer's status as our error."""
    by_code = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                        ResourceExhausted, Unavailable, Cancelled, DeadlineExceeded)}
    cls = by_code.get(exc.code(), OpenLoRAError)
    return cls(exc.details() or str(exc.code()))


def _already_aborted(context: grpc.ServicerContext) -> bool:
    """context.abort() raises a bare Exception after setting the status: let it through."""
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return False
    return code is not None and code != grpc.StatusCode.OK


def _abort(context: grpc.ServicerContext, exc: BaseException):
    if _already_aborted(context):
        raise exc
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    context.abort(code, message)


def grpc_errors(method):
    """Decorate a servicer method (unary or streaming) so our errors become statuses."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
                _abort(context, exc)
        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
            _abort(context, exc)
    return unary_wrapper
