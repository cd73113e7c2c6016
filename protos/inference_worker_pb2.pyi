from protos import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter", "pin")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    pin: bool
    def __init__(self, adapter: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter_key", "load_ms", "tier")
    ADAPTER_KEY_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    adapter_key: str
    load_ms: float
    tier: str
    def __init__(self, adapter_key: _Optional[str] = ..., load_ms: _Optional[float] = ..., tier: _Optional[str] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    def __init__(self, adapter: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ("was_loaded",)
    WAS_LOADED_FIELD_NUMBER: _ClassVar[int]
    was_loaded: bool
    def __init__(self, was_loaded: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "base_model", "gpu_adapters", "cpu_adapters", "free_adapter_slots", "total_adapter_slots", "running_requests", "waiting_requests", "kv_blocks_used", "kv_blocks_total", "draining", "device", "address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    CPU_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    FREE_ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    base_model: str
    gpu_adapters: _containers.RepeatedScalarFieldContainer[str]
    cpu_adapters: _containers.RepeatedScalarFieldContainer[str]
    free_adapter_slots: int
    total_adapter_slots: int
    running_requests: int
    waiting_requests: int
    kv_blocks_used: int
    kv_blocks_total: int
    draining: bool
    device: str
    address: str
    def __init__(self, worker_id: _Optional[str] = ..., base_model: _Optional[str] = ..., gpu_adapters: _Optional[_Iterable[str]] = ..., cpu_adapters: _Optional[_Iterable[str]] = ..., free_adapter_slots: _Optional[int] = ..., total_adapter_slots: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., draining: _Optional[bool] = ..., device: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...
