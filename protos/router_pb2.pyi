from protos import generate_pb2 as _generate_pb2
from protos import inference_worker_pb2 as _inference_worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("address", "healthy", "status", "last_seen_ago_ms")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AGO_MS_FIELD_NUMBER: _ClassVar[int]
    address: str
    healthy: bool
    status: _inference_worker_pb2.WorkerStatus
    last_seen_ago_ms: float
    def __init__(self, address: _Optional[str] = ..., healthy: _Optional[bool] = ..., status: _Optional[_Union[_inference_worker_pb2.WorkerStatus, _Mapping]] = ..., last_seen_ago_ms: _Optional[float] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...
