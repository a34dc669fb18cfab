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
KV_TENSOR_UNSPECIFIED: KvTensor
KV_TENSOR_KEY: KvTensor
KV_TENSOR_VALUE: KvTensor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "model_fingerprint", "max_chunk_bytes", "cached_prefix_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    model_fingerprint: str
    max_chunk_bytes: int
    cached_prefix_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., model_fingerprint: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., cached_prefix_tokens: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("layer", "tensor", "first_token", "shape", "dtype", "data", "crc32c")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tensor: KvTensor
    first_token: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    crc32c: int
    def __init__(self, layer: _Optional[int] = ..., tensor: _Optional[_Union[KvTensor, str]] = ..., first_token: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("chunk", "summary")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    chunk: KvChunk
    summary: PrefillSummary
    def __init__(self, chunk: _Optional[_Union[KvChunk, _Mapping]] = ..., summary: _Optional[_Union[PrefillSummary, _Mapping]] = ...) -> None: ...
