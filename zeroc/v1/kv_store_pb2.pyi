from zeroc.v1 import prefill_pb2 as _prefill_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FetchBlocksRequest(_message.Message):
    __slots__ = ("block_ids", "seed", "first_token", "max_chunk_bytes")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[str]
    seed: str
    first_token: int
    max_chunk_bytes: int
    def __init__(self, block_ids: _Optional[_Iterable[str]] = ..., seed: _Optional[str] = ..., first_token: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class FetchBlocksHeader(_message.Message):
    __slots__ = ("num_blocks", "block_crc32c", "block_mac")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_CRC32C_FIELD_NUMBER: _ClassVar[int]
    BLOCK_MAC_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    block_crc32c: _containers.RepeatedScalarFieldContainer[int]
    block_mac: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, num_blocks: _Optional[int] = ..., block_crc32c: _Optional[_Iterable[int]] = ..., block_mac: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FetchBlocksResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FetchBlocksHeader
    chunk: _prefill_pb2.KvChunk
    def __init__(self, header: _Optional[_Union[FetchBlocksHeader, _Mapping]] = ..., chunk: _Optional[_Union[_prefill_pb2.KvChunk, _Mapping]] = ...) -> None: ...
