"""Moving a prompt's KV cache from a prefill service into a decode service's paged cache.

On the wire a layer's keys and values travel as `zeroc.v1.KvChunk` messages: raw bytes of a
contiguous token range with dtype, shape, layer, a CRC32C and, in a deployment with a cluster key,
a MAC made by the prefill service (`zeroc.stream_mac`). `encode_layer_wire` (prefill side)
cuts a layer into serialized chunks; `parse_prefill_response` and `decode_chunk` (decode side)
split, check and view one; `KvReceiver` writes the pieces into the cache slots reserved for the
request and checks that every layer arrived whole. `KvTransport` is the seam between the two
services.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import google_crc32c
import grpc
import torch
from torch import Tensor

from zeroc.kv_cache import PagedKVCache
from zeroc.rpc import add_servicer
from zeroc.stream_mac import check_chunk, chunk_mac, request_key
from zeroc.tls import Tls, open_channel
from zeroc.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
KEY, VALUE = prefill_pb2.KV_TENSOR_KEY, prefill_pb2.KV_TENSOR_VALUE
TIER_KEY, TIER_VALUE = prefill_pb2.KV_TENSOR_TIER_KEY, prefill_pb2.KV_TENSOR_TIER_VALUE
_PREFILL = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].methods_by_name["Prefill"]
PREFILL_METHOD = f"/{_PREFILL.containing_service.full_name}/{_PREFILL.name}"


class KvTransferError(RuntimeError):
    """A transfer failed; `code` is the gRPC status the decode service answers its client with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a model's config, tokenizer and weight files: KV from another model must not mix."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for name in ("config.json", "tokenizer.json"):
        if (root / name).is_file():
            h.update((root / name).read_bytes())
    for weights in sorted(root.glob("*.safetensors")):
        # Size, the head (header and first tensors) and 64 KiB at 32 strided offsets identify weights
        # cheaply; the samples tell apart fine-tunes that share a header and their first tensors.
        size = weights.stat().st_size
        h.update(str(size).encode())
        with weights.open("rb") as f:
            h.update(f.read(1 << 20))
            for i in range(1, 33):
                f.seek(size * i // 33)
                h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


# -- the wire format ----------------------------------------------------------------------------
# Chunks travel as plain `zeroc.v1.PrefillResponse{chunk: KvChunk}` protobuf messages. The hot path
# writes and reads that encoding itself (`encode_layer_wire`, `parse_prefill_response`) so a payload
# is copied once per side instead of through tensor -> bytes -> message -> serialized bytes and back;
# `encode_layer` / `decode_chunk` on messages stay for tools and tests. docs/benchmarks.md, "KV
# transfer", has the measurements.
_CHUNK_KEY = b"\x0a"  # PrefillResponse.chunk: field 1, length-delimited
_DATA_KEY = b"\x32"  # KvChunk.data: field 6, length-delimited
_DATA_FIELD = 6


def _layer_parts(k: Tensor, v: Tensor, max_bytes: int, tier: bool = False) -> Iterator[tuple[int, int, Tensor]]:
    """(KEY or VALUE, first row, rows) slices of a layer's keys then values, each <= max_bytes (>= 1 row);
    TIER_KEY and TIER_VALUE for a token tier's rows."""
    for kind, t in ((TIER_KEY, k), (TIER_VALUE, v)) if tier else ((KEY, k), (VALUE, v)):
        t = t.detach().contiguous().cpu()
        row_bytes = t[0].numel() * t.element_size() if len(t) else 1
        step = max(1, max_bytes // row_bytes)
        for start in range(0, t.shape[0], step):
            yield kind, start, t[start:start + step]


def _header(layer: int, kind: int, first_token: int, part: Tensor, data: bytes, mac_key: bytes | None
            ) -> prefill_pb2.KvChunk:
    """Every KvChunk field but `data` (`mac` with a request's `mac_key`). part: [tokens, kv_heads, width]; data:
    its raw bytes."""
    chunk = prefill_pb2.KvChunk(layer=layer, tensor=kind, first_token=first_token, shape=list(part.shape),
                                dtype=DTYPE_NAMES[part.dtype], crc32c=google_crc32c.value(data))
    if mac_key is not None:
        chunk.mac = chunk_mac(mac_key, layer, kind, first_token, chunk.shape, chunk.dtype, data)
    return chunk


def encode_layer(layer: int, k: Tensor, v: Tensor, first_token: int, max_bytes: int, mac_key: bytes | None = None
                 ) -> Iterator[prefill_pb2.KvChunk]:
    """Chunks of one layer's KV for a token range. k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim]. `mac_key`:
    the request's key (`zeroc.stream_mac.request_key`); None sends no MAC."""
    for kind, start, part in _layer_parts(k, v, max_bytes):
        data = part.view(torch.uint8).numpy().tobytes()
        chunk = _header(layer, kind, first_token + start, part, data, mac_key)
        chunk.data = data
        yield chunk


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_layer_wire(layer: int, k: Tensor, v: Tensor, first_token: int, max_bytes: int,
                      tier: bool = False, mac_key: bytes | None = None) -> Iterator[bytes]:
    """The chunks of `encode_layer`, each as a serialized PrefillResponse: the payload is copied twice
    (out of the tensor, into the message) where building protobuf messages copies it four times.
    Parsers see standard protobuf: the header fields, then `data` last (field order is free on the
    wire). k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim] (`tier`: a token tier's extra rows); `mac_key` as in
    `encode_layer`."""
    for kind, start, part in _layer_parts(k, v, max_bytes, tier):
        data = part.view(torch.uint8).numpy().tobytes()
        header = _header(layer, kind, first_token + start, part, data, mac_key).SerializeToString()
        data_len = _varint(len(data))
        body = len(header) + len(_DATA_KEY) + len(data_len) + len(data)
        yield b"".join((_CHUNK_KEY, _varint(body), header, _DATA_KEY, data_len, data))


def _serialize_prefill_response(msg: prefill_pb2.PrefillResponse | bytes) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def add_prefill_service(servicer: prefill_pb2_grpc.PrefillServiceServicer, server: grpc.Server) -> None:
    """Register a PrefillService servicer (`add_servicer`: undecodable requests are INVALID_ARGUMENT),
    except that its Prefill may yield chunks already serialized by `encode_layer_wire`."""
    def replace(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method == "Prefill":
            return handler._replace(response_serializer=_serialize_prefill_response)
        return handler

    add_servicer(prefill_pb2_grpc.add_PrefillServiceServicer_to_server, servicer, server, replace)


@dataclass(frozen=True)
class WireChunk:
    """A received chunk, not yet checked: its metadata and its payload left in the received buffer."""

    header: prefill_pb2.KvChunk  # every field but `data`
    payload: bytes


class _Unusual(Exception):
    """The message is not a single well-formed chunk; protobuf parses it (or rejects it) instead."""


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if pos >= len(buf):
            raise _Unusual
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Unusual


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of field, start of value, end) of each field in buf[pos:end]."""
    while pos < end:
        tag, value = _read_varint(buf, pos)
        wire_type = tag & 7
        if wire_type == 0:
            nxt = _read_varint(buf, value)[1]
        elif wire_type == 2:
            size, value = _read_varint(buf, value)
            nxt = value + size
        elif wire_type in (1, 5):
            nxt = value + (8 if wire_type == 1 else 4)
        else:
            raise _Unusual  # groups never occur in these messages
        if nxt > end:
            raise _Unusual
        yield tag >> 3, wire_type, pos, value, nxt
        pos = nxt


def _split_chunk(raw: bytes) -> WireChunk:
    """Header fields (in any order) parsed by protobuf; the payload sliced out of `raw` once."""
    outer = list(_fields(raw, 0, len(raw)))
    if len(outer) != 1 or outer[0][:2] != (1, 2):  # exactly one `chunk`, else leave it to protobuf
        raise _Unusual
    header, payload = [], None
    for number, wire_type, start, value, end in _fields(raw, outer[0][3], outer[0][4]):
        if (number, wire_type) == (_DATA_FIELD, 2):
            if payload is not None:
                raise _Unusual
            payload = raw[value:end]
        else:
            header.append(raw[start:end])
    if payload is None:
        raise _Unusual
    return WireChunk(prefill_pb2.KvChunk.FromString(b"".join(header)), payload)


def parse_prefill_response(raw: bytes) -> WireChunk | prefill_pb2.PrefillSummary | prefill_pb2.PrefillResponse:
    """Response deserializer of the decode side's Prefill calls: a chunk, the summary, or (out of
    band transports) the whole response.

    Raises google.protobuf.message.DecodeError on garbage (gRPC then fails the call)."""
    try:
        return _split_chunk(raw)
    except _Unusual:
        msg = prefill_pb2.PrefillResponse.FromString(raw)
        if msg.HasField("chunk"):
            return WireChunk(msg.chunk, msg.chunk.data)
        # Out-of-band descriptors (`remote`) stay messages for the transports of zeroc/transport/.
        return msg.summary if msg.HasField("summary") else msg


@dataclass(frozen=True)
class KvPiece:
    """One checked chunk: keys or values of `data.shape[0]` tokens of one layer."""

    layer: int
    is_key: bool
    first_token: int
    data: Tensor  # [tokens, kv_heads, width]
    tier: bool = False  # a token tier's extra rows (TIER_KEY / TIER_VALUE), not the cache's


# The payload view is only ever read (copied into the cache), so torch's note about a read-only
# buffer does not apply; the filter is limited to this module.
warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning, __name__)


def decode_chunk(msg: prefill_pb2.KvChunk | WireChunk, mac_key: bytes | None = None) -> KvPiece:
    """Check a chunk and view its payload as a tensor (no copy); a CRC mismatch, inconsistent metadata or,
    with the request's `mac_key`, a missing or wrong MAC raises KvTransferError(DATA_LOSS)."""
    head, data = (msg.header, msg.payload) if isinstance(msg, WireChunk) else (msg, msg.data)
    if google_crc32c.value(data) != head.crc32c:
        raise KvTransferError(grpc.StatusCode.DATA_LOSS,
                              f"KV chunk of layer {head.layer} at token {head.first_token} failed its CRC32C check")
    dtype = DTYPES_BY_NAME.get(head.dtype)
    shape = tuple(head.shape)
    if dtype is None or len(shape) != 3 or head.tensor not in (KEY, VALUE, TIER_KEY, TIER_VALUE):
        raise KvTransferError(grpc.StatusCode.DATA_LOSS,
                              f"KV chunk has bad metadata (dtype={head.dtype!r}, shape={shape}, tensor={head.tensor})")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if shape[0] * shape[1] * shape[2] * itemsize != len(data):
        raise KvTransferError(grpc.StatusCode.DATA_LOSS,
                              f"KV chunk carries {len(data)} bytes but shape {shape} of {head.dtype} needs "
                              f"{shape[0] * shape[1] * shape[2] * itemsize}")
    if mac_key is not None:
        _check_mac(mac_key, head, data)
    view = torch.frombuffer(data, dtype=dtype).view(shape) if data else torch.empty(shape, dtype=dtype)
    return KvPiece(head.layer, head.tensor in (KEY, TIER_KEY), head.first_token, view,
                   head.tensor in (TIER_KEY, TIER_VALUE))


def _check_mac(mac_key: bytes, head: prefill_pb2.KvChunk, data: bytes) -> None:
    where = f"KV chunk of layer {head.layer} at token {head.first_token}"
    if not head.mac:
        raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"{where} carries no MAC: the prefill service has no "
                              "cluster key (ZEROC_SECURITY_CLUSTER_KEY, the same on every service) or predates MACs")
    if not check_chunk(mac_key, head.layer, head.tensor, head.first_token, head.shape, head.dtype, data, head.mac):
        raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"{where} failed its MAC check: not computed by a service "
                              "of this deployment (or the services' cluster keys differ); its KV is not used")


def tier_chunk(msg: WireChunk, mac_key: bytes | None = None) -> KvPiece:
    """An in-band chunk on a stream whose KV goes out of band: only a token tier's rows may come so."""
    piece = decode_chunk(msg, mac_key)
    if not piece.tier:
        raise KvTransferError(grpc.StatusCode.DATA_LOSS, "in-band KV chunk on an out-of-band transfer")
    return piece


class KvReceiver:
    """Writes one request's incoming KV into its reserved cache slots (decode side).

    `start`: the prompt position of the first expected token (the KV of earlier tokens came from
    the KV store); chunks carry prompt positions. `tier`: where a token tier's rows land, for a
    model that keeps one (their chunks are refused otherwise)."""

    def __init__(self, cache: PagedKVCache, slots: Tensor, start: int = 0, tier: TierRows | None = None):
        self.cache, self.tier = cache, tier
        self.slots = slots  # [T] flat cache slot of each prompt token whose KV is expected
        self.start = start
        self.num_tokens = int(slots.shape[0])
        self.bytes_received = 0
        self._filled = torch.zeros(cache.num_layers, 2, self.num_tokens, dtype=torch.bool)

    def write(self, piece: KvPiece) -> None:
        if piece.tier:
            if self.tier is None:
                raise KvTransferError(grpc.StatusCode.FAILED_PRECONDITION, "KV chunk of a token tier; this model "
                                      "keeps none (a different model?)")
            self.tier.write(piece)
            self.bytes_received += piece.data.numel() * piece.data.element_size()
            return
        n = piece.data.shape[0]
        first = piece.first_token - self.start
        if not 0 <= piece.layer < self.cache.num_layers:
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"KV chunk for layer {piece.layer}; the model has "
                                  f"{self.cache.num_layers}")
        if first < 0 or first + n > self.num_tokens:
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"KV chunk covers tokens up to {piece.first_token + n}; "
                                  f"the prompt sent has {self.start + self.num_tokens} (from {self.start})")
        shape = self.cache.shapes[piece.layer]
        width = shape.k_dim if piece.is_key else shape.v_dim
        if tuple(piece.data.shape[1:]) != (shape.kv_heads, width):
            raise KvTransferError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"KV chunk rows are {tuple(piece.data.shape[1:])}; this cache stores "
                                  f"{(shape.kv_heads, width)} (a different model?)")
        if n == 0:
            return
        self.cache.write_rows(piece.layer, piece.is_key, self.slots[first:first + n], piece.data)
        self._filled[piece.layer, 0 if piece.is_key else 1, first:first + n] = True
        self.bytes_received += piece.data.numel() * piece.data.element_size()

    def check_complete(self) -> None:
        if not bool(self._filled.all()):
            missing = (~self._filled).nonzero()[0].tolist()
            raise KvTransferError(grpc.StatusCode.DATA_LOSS,
                                  f"KV transfer ended incomplete (first gap: layer {missing[0]}, token "
                                  f"{self.start + missing[2]})")
        if self.tier is not None:
            self.tier.check_complete()


class TierRows:
    """A prompt's token-tier rows as they arrive (decode side; zeroc/policies/tier.py): per layer the extra key
    and value dims of the tokens at `positions` only (the sinks and the last `recent` tokens), for
    `TierPools.load_tier`."""

    def __init__(self, widths: list[tuple[int, int, int]], tokens: int, positions: list[range],
                 dtype: torch.dtype):
        # widths: per layer (kv_heads, tier_k, tier_v); k[layer]: [P, kv_heads, tier_k], v likewise
        expected = torch.zeros(tokens, dtype=torch.bool)
        for r in positions:
            expected[r.start:r.stop] = True
        self.positions = expected.nonzero()[:, 0]  # [P] ascending
        self._row = expected.cumsum(0) - 1  # [tokens] row of each expected position in k and v
        self._expected = expected
        p = len(self.positions)
        self.k = [torch.zeros(p, h, tk, dtype=dtype) for h, tk, _ in widths]
        self.v = [torch.zeros(p, h, tv, dtype=dtype) for h, _, tv in widths]
        self._filled = torch.zeros(len(widths), 2, p, dtype=torch.bool)

    def write(self, piece: KvPiece) -> None:
        n, first = piece.data.shape[0], piece.first_token
        if not 0 <= piece.layer < len(self.k):
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"tier chunk for layer {piece.layer}; the model has "
                                  f"{len(self.k)}")
        if first < 0 or first + n > len(self._expected) or not bool(self._expected[first:first + n].all()):
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"tier chunk covers tokens [{first}, {first + n}), "
                                  "outside the prompt's sinks and recent window")
        dest = (self.k if piece.is_key else self.v)[piece.layer]
        if tuple(piece.data.shape[1:]) != tuple(dest.shape[1:]):
            raise KvTransferError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"tier chunk rows are {tuple(piece.data.shape[1:])}; this model's tier keeps "
                                  f"{tuple(dest.shape[1:])} (a different model?)")
        rows = self._row[first:first + n]
        dest[rows] = piece.data.to(dest.dtype)
        self._filled[piece.layer, 0 if piece.is_key else 1, rows] = True

    def check_complete(self) -> None:
        gaps = (~self._filled).nonzero()
        if len(gaps):
            layer, _, row = gaps[0].tolist()
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, "KV transfer ended without the token tier's rows "
                                  f"(first gap: layer {layer}, token {int(self.positions[row])})")


# -- the seam ------------------------------------------------------------------------------------
class KvTransport(abc.ABC):
    """Gets the KV of a prompt's tokens from a prefill service into a decode cache.

    The decode side calls `fetch` once per request, after reserving cache slots, and `close` at
    shutdown. The prefill side serves the other end (today the `zeroc.v1.PrefillService` gRPC
    stream; an NCCL transport would exchange ids over that RPC and move the tensors out of band).
    """

    kind: str | None = "grpc"  # how KV travels (zeroc.transport.capability's names); None: not chosen yet

    @abc.abstractmethod
    def fetch(self, request_id: str, token_ids: list[int], receiver: KvReceiver, timeout_s: float,
              is_active: Callable[[], bool], cached_prefix_tokens: int = 0, tenant: str = "",
              priority: int = 0) -> int:
        """Fill `receiver` with the KV of `token_ids[cached_prefix_tokens:]` (the prefix's KV is in place
        already, from the KV store), `tenant`'s prompt, of scheduling `priority` (the prefill service's queue order,
        lower first); returns payload bytes received.

        Raises KvTransferError; gives up early (CANCELLED) once `is_active()` turns false."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""


class GrpcKvTransport(KvTransport):
    """KV over the `zeroc.v1.PrefillService.Prefill` server stream. With a `mac_key` (`zeroc.stream_mac.stream_key`)
    every chunk must carry the MAC its prefill service made under the deployment's key."""

    def __init__(self, target: str, fingerprint: str, chunk_bytes: int, max_message_bytes: int,
                 tls: Tls | None = None, mac_key: bytes | None = None):
        self.target, self.fingerprint, self.chunk_bytes = target, fingerprint, chunk_bytes
        self.mac_key = mac_key
        self._channel = open_channel(target, tls, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ])
        self._stub = prefill_pb2_grpc.PrefillServiceStub(self._channel)  # the other methods
        # The generated Prefill would parse every chunk into a message (two more payload copies).
        self._prefill = self._channel.unary_stream(
            PREFILL_METHOD, request_serializer=prefill_pb2.PrefillRequest.SerializeToString,
            response_deserializer=parse_prefill_response, _registered_method=True)

    def fetch(self, request_id: str, token_ids: list[int], receiver: KvReceiver, timeout_s: float,
              is_active: Callable[[], bool], cached_prefix_tokens: int = 0, tenant: str = "",
              priority: int = 0) -> int:
        request = prefill_pb2.PrefillRequest(request_id=request_id, token_ids=token_ids,
                                             model_fingerprint=self.fingerprint, max_chunk_bytes=self.chunk_bytes,
                                             cached_prefix_tokens=cached_prefix_tokens, tenant=tenant,
                                             priority=priority)
        deadline = time.monotonic() + timeout_s
        key = request_key(self.mac_key, request_id, token_ids, cached_prefix_tokens) if self.mac_key else None
        call = self._prefill(self._extend(request), timeout=timeout_s, wait_for_ready=False)
        try:
            for msg in call:
                if not is_active():
                    call.cancel()
                    raise KvTransferError(grpc.StatusCode.CANCELLED, "request cancelled during KV transfer")
                if not isinstance(msg, prefill_pb2.PrefillSummary):
                    receiver.write(self._piece(msg, deadline, key))
                elif msg.num_tokens != len(token_ids):
                    raise KvTransferError(grpc.StatusCode.DATA_LOSS, "prefill summary names "
                                          f"{msg.num_tokens} tokens, {len(token_ids)} were sent")
        except grpc.RpcError as exc:
            code = exc.code()
            # The prefill service's own verdicts pass through; a dead peer reads as UNAVAILABLE.
            if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                code = grpc.StatusCode.UNAVAILABLE if is_active() else grpc.StatusCode.CANCELLED
            raise KvTransferError(code, f"prefill service {self.target}: {exc.details()}") from None
        except KvTransferError:
            call.cancel()
            raise
        receiver.check_complete()
        return receiver.bytes_received

    # Hooks for the out-of-band transports (zeroc/transport/), which reuse this stream for metadata.
    def _extend(self, request: prefill_pb2.PrefillRequest) -> prefill_pb2.PrefillRequest:
        return request

    def _piece(self, msg: WireChunk | prefill_pb2.PrefillResponse, deadline: float, key: bytes | None) -> KvPiece:
        """The checked piece a message carries; `key`: the request's MAC key (None: no MACs checked)."""
        if not isinstance(msg, WireChunk):
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, "the prefill service sent KV out of band; "
                                  "this transport expects in-band chunks")
        return decode_chunk(msg, key)

    def close(self) -> None:
        self._channel.close()
