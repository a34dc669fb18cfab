from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvTensor(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TENSOR_UNSPECIFIED: _ClassVar[KvTensor]
    KV_TENSOR_KEY: _ClassVar[KvTensor]
    KV_TENSOR_VALUE: _ClassVar[KvTensor]
    KV_TENSOR_TIER_KEY: _ClassVar[KvTensor]
    KV_TENSOR_TIER_VALUE: _ClassVar[KvTensor]

class KvTransportKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSPORT_KIND_UNSPECIFIED: _ClassVar[KvTransportKind]
    KV_TRANSPORT_KIND_GRPC: _ClassVar[KvTransportKind]
    KV_TRANSPORT_KIND_NCCL: _ClassVar[KvTransportKind]
    KV_TRANSPORT_KIND_CUDA_IPC: _ClassVar[KvTransportKind]

class KvLinkState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_LINK_STATE_UNSPECIFIED: _ClassVar[KvLinkState]
    KV_LINK_STATE_ACCEPTED: _ClassVar[KvLinkState]
    KV_LINK_STATE_READY: _ClassVar[KvLinkState]
KV_TENSOR_UNSPECIFIED: KvTensor
KV_TENSOR_KEY: KvTensor
KV_TENSOR_VALUE: KvTensor
KV_TENSOR_TIER_KEY: KvTensor
KV_TENSOR_TIER_VALUE: KvTensor
KV_TRANSPORT_KIND_UNSPECIFIED: KvTransportKind
KV_TRANSPORT_KIND_GRPC: KvTransportKind
KV_TRANSPORT_KIND_NCCL: KvTransportKind
KV_TRANSPORT_KIND_CUDA_IPC: KvTransportKind
KV_LINK_STATE_UNSPECIFIED: KvLinkState
KV_LINK_STATE_ACCEPTED: KvLinkState
KV_LINK_STATE_READY: KvLinkState

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "model_fingerprint", "max_chunk_bytes", "cached_prefix_tokens", "transport", "link_id", "tenant", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    LINK_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    model_fingerprint: str
    max_chunk_bytes: int
    cached_prefix_tokens: int
    transport: KvTransportKind
    link_id: str
    tenant: str
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., model_fingerprint: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., cached_prefix_tokens: _Optional[int] = ..., transport: _Optional[_Union[KvTransportKind, str]] = ..., link_id: _Optional[str] = ..., tenant: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("layer", "tensor", "first_token", "shape", "dtype", "data", "crc32c", "mac")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tensor: KvTensor
    first_token: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    crc32c: int
    mac: bytes
    def __init__(self, layer: _Optional[int] = ..., tensor: _Optional[_Union[KvTensor, str]] = ..., first_token: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ..., mac: _Optional[bytes] = ...) -> None: ...

class PrefillSummary(_message.Message):
    __slots__ = ("num_tokens", "num_layers", "kv_bytes")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    num_layers: int
    kv_bytes: int
    def __init__(self, num_tokens: _Optional[int] = ..., num_layers: _Optional[int] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("chunk", "summary", "remote")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    chunk: KvChunk
    summary: PrefillSummary
    remote: KvRemoteTensor
    def __init__(self, chunk: _Optional[_Union[KvChunk, _Mapping]] = ..., summary: _Optional[_Union[PrefillSummary, _Mapping]] = ..., remote: _Optional[_Union[KvRemoteTensor, _Mapping]] = ...) -> None: ...

class KvCapability(_message.Message):
    __slots__ = ("cuda", "device_uuid", "host_id", "nccl_version", "transports", "why_not")
    CUDA_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    NCCL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    WHY_NOT_FIELD_NUMBER: _ClassVar[int]
    cuda: bool
    device_uuid: str
    host_id: str
    nccl_version: str
    transports: _containers.RepeatedScalarFieldContainer[KvTransportKind]
    why_not: str
    def __init__(self, cuda: _Optional[bool] = ..., device_uuid: _Optional[str] = ..., host_id: _Optional[str] = ..., nccl_version: _Optional[str] = ..., transports: _Optional[_Iterable[_Union[KvTransportKind, str]]] = ..., why_not: _Optional[str] = ...) -> None: ...

class GetKvCapabilityRequest(_message.Message):
    __slots__ = ("capability",)
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    capability: KvCapability
    def __init__(self, capability: _Optional[_Union[KvCapability, _Mapping]] = ...) -> None: ...

class GetKvCapabilityResponse(_message.Message):
    __slots__ = ("capability",)
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    capability: KvCapability
    def __init__(self, capability: _Optional[_Union[KvCapability, _Mapping]] = ...) -> None: ...

class OpenKvLinkRequest(_message.Message):
    __slots__ = ("link_id", "nccl_unique_id", "timeout_ms", "model_fingerprint")
    LINK_ID_FIELD_NUMBER: _ClassVar[int]
    NCCL_UNIQUE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    link_id: str
    nccl_unique_id: bytes
    timeout_ms: int
    model_fingerprint: str
    def __init__(self, link_id: _Optional[str] = ..., nccl_unique_id: _Optional[bytes] = ..., timeout_ms: _Optional[int] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class OpenKvLinkResponse(_message.Message):
    __slots__ = ("state", "nccl_version")
    STATE_FIELD_NUMBER: _ClassVar[int]
    NCCL_VERSION_FIELD_NUMBER: _ClassVar[int]
    state: KvLinkState
    nccl_version: str
    def __init__(self, state: _Optional[_Union[KvLinkState, str]] = ..., nccl_version: _Optional[str] = ...) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("storage_handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "tensor_offset", "stride")
    STORAGE_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    tensor_offset: int
    stride: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, storage_handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., tensor_offset: _Optional[int] = ..., stride: _Optional[_Iterable[int]] = ...) -> None: ...

class KvRemoteTensor(_message.Message):
    __slots__ = ("layer", "tensor", "first_token", "shape", "dtype", "nbytes", "ipc", "mac")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tensor: KvTensor
    first_token: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    nbytes: int
    ipc: CudaIpcHandle
    mac: bytes
    def __init__(self, layer: _Optional[int] = ..., tensor: _Optional[_Union[KvTensor, str]] = ..., first_token: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., nbytes: _Optional[int] = ..., ipc: _Optional[_Union[CudaIpcHandle, _Mapping]] = ..., mac: _Optional[bytes] = ...) -> None: ...
