"""Moving a prompt's KV cache from a prefill service into a decode service's paged cache.

On the wire a layer's keys and values travel as `zeroc.v1.KvChunk` messages: raw bytes of a
contiguous token range with dtype, shape, layer and a CRC32C. `encode_layer` (prefill side)
cuts a layer into chunks; `decode_chunk` (decode side) checks and parses one; `KvReceiver`
writes parsed pieces into the cache slots reserved for the request and checks that every
layer arrived whole. `KvTransport` is the seam between the two services.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import google_crc32c
import grpc
import torch
from torch import Tensor

from zeroc.kv_cache import PagedKVCache
from zeroc.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
KEY, VALUE = prefill_pb2.KV_TENSOR_KEY, prefill_pb2.KV_TENSOR_VALUE


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
def encode_layer(layer: int, k: Tensor, v: Tensor, first_token: int, max_bytes: int
                 ) -> Iterator[prefill_pb2.KvChunk]:
    """Chunks of one layer's KV for a token range. k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim]."""
    for kind, t in ((KEY, k), (VALUE, v)):
        t = t.detach().contiguous().cpu()
        row_bytes = t[0].numel() * t.element_size() if len(t) else 1
        step = max(1, max_bytes // row_bytes)
        for start in range(0, t.shape[0], step):
            part = t[start:start + step]
            data = part.view(torch.uint8).numpy().tobytes()
            yield prefill_pb2.KvChunk(layer=layer, tensor=kind, first_token=first_token + start,
                                      shape=list(part.shape), dtype=DTYPE_NAMES[t.dtype], data=data,
                                      crc32c=google_crc32c.value(data))


@dataclass(frozen=True)
class KvPiece:
    """One checked chunk: keys or values of `data.shape[0]` tokens of one layer."""

    layer: int
    is_key: bool
    first_token: int
    data: Tensor  # [tokens, kv_heads, width]


def decode_chunk(msg: prefill_pb2.KvChunk) -> KvPiece:
    """Parse a chunk; a CRC mismatch or inconsistent metadata raises KvTransferError(DATA_LOSS)."""
    if google_crc32c.value(msg.data) != msg.crc32c:
        raise KvTransferError(grpc.StatusCode.DATA_LOSS,
                              f"KV chunk of layer {msg.layer} at token {msg.first_token} failed its CRC32C check")
    dtype = DTYPES_BY_NAME.get(msg.dtype)
    shape = tuple(msg.shape)
    if dtype is None or len(shape) != 3 or msg.tensor not in (KEY, VALUE):
        raise KvTransferError(grpc.StatusCode.DATA_LOSS,
                              f"KV chunk has bad metadata (dtype={msg.dtype!r}, shape={shape}, tensor={msg.tensor})")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if shape[0] * shape[1] * shape[2] * itemsize != len(msg.data):
        raise KvTransferError(grpc.StatusCode.DATA_LOSS,
                              f"KV chunk carries {len(msg.data)} bytes but shape {shape} of {msg.dtype} needs "
                              f"{shape[0] * shape[1] * shape[2] * itemsize}")
    data = torch.frombuffer(bytearray(msg.data), dtype=dtype).view(shape)
    return KvPiece(msg.layer, msg.tensor == KEY, msg.first_token, data)


class KvReceiver:
    """Writes one request's incoming KV into its reserved cache slots (decode side).

    `start`: the prompt position of the first expected token (the KV of earlier tokens came from
    the KV store); chunks carry prompt positions."""

    def __init__(self, cache: PagedKVCache, slots: Tensor, start: int = 0):
        self.cache = cache
        self.slots = slots  # [T] flat cache slot of each prompt token whose KV is expected
        self.start = start
        self.num_tokens = int(slots.shape[0])
        self.bytes_received = 0
        self._filled = torch.zeros(len(cache.k_pools), 2, self.num_tokens, dtype=torch.bool)

    def write(self, piece: KvPiece) -> None:
        n = piece.data.shape[0]
        first = piece.first_token - self.start
        if not 0 <= piece.layer < len(self.cache.k_pools):
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"KV chunk for layer {piece.layer}; the model has "
                                  f"{len(self.cache.k_pools)}")
        if first < 0 or first + n > self.num_tokens:
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"KV chunk covers tokens up to {piece.first_token + n}; "
                                  f"the prompt sent has {self.start + self.num_tokens} (from {self.start})")
        pool = (self.cache.k_pools if piece.is_key else self.cache.v_pools)[piece.layer]
        if tuple(piece.data.shape[1:]) != tuple(pool.shape[2:]):
            raise KvTransferError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"KV chunk rows are {tuple(piece.data.shape[1:])}; this cache stores "
                                  f"{tuple(pool.shape[2:])} (a different model?)")
        slots = self.slots[first:first + n]
        pool.view(-1, *pool.shape[2:])[slots] = piece.data.to(pool.dtype)
        self._filled[piece.layer, 0 if piece.is_key else 1, first:first + n] = True
        self.bytes_received += piece.data.numel() * piece.data.element_size()

    def check_complete(self) -> None:
        if not bool(self._filled.all()):
            missing = (~self._filled).nonzero()[0].tolist()
            raise KvTransferError(grpc.StatusCode.DATA_LOSS,
                                  f"KV transfer ended incomplete (first gap: layer {missing[0]}, token "
                                  f"{self.start + missing[2]})")


# -- the seam ------------------------------------------------------------------------------------
class KvTransport(abc.ABC):
    """Gets the KV of a prompt's tokens from a prefill service into a decode cache.

    The decode side calls `fetch` once per request, after reserving cache slots, and `close` at
    shutdown. The prefill side serves the other end (today the `zeroc.v1.PrefillService` gRPC
    stream; an NCCL transport would exchange ids over that RPC and move the tensors out of band).
    """

    @abc.abstractmethod
    def fetch(self, request_id: str, token_ids: list[int], receiver: KvReceiver, timeout_s: float,
              is_active: Callable[[], bool], cached_prefix_tokens: int = 0) -> int:
        """Fill `receiver` with the KV of `token_ids[cached_prefix_tokens:]` (the prefix's KV is in place
        already, from the KV store); returns payload bytes received.

        Raises KvTransferError; gives up early (CANCELLED) once `is_active()` turns false."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""


class GrpcKvTransport(KvTransport):
    """KV over the `zeroc.v1.PrefillService.Prefill` server stream."""

    def __init__(self, target: str, fingerprint: str, chunk_bytes: int, max_message_bytes: int):
        self.target, self.fingerprint, self.chunk_bytes = target, fingerprint, chunk_bytes
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ])
        self._stub = prefill_pb2_grpc.PrefillServiceStub(self._channel)

    def fetch(self, request_id: str, token_ids: list[int], receiver: KvReceiver, timeout_s: float,
              is_active: Callable[[], bool], cached_prefix_tokens: int = 0) -> int:
        request = prefill_pb2.PrefillRequest(request_id=request_id, token_ids=token_ids,
                                             model_fingerprint=self.fingerprint, max_chunk_bytes=self.chunk_bytes,
                                             cached_prefix_tokens=cached_prefix_tokens)
        deadline = time.monotonic() + timeout_s
        call = self._stub.Prefill(self._extend(request), timeout=timeout_s, wait_for_ready=False)
        try:
            for msg in call:
                if not is_active():
                    call.cancel()
                    raise KvTransferError(grpc.StatusCode.CANCELLED, "request cancelled during KV transfer")
                if not msg.HasField("summary"):
                    receiver.write(self._piece(msg, deadline))
                elif msg.summary.num_tokens != len(token_ids):
                    raise KvTransferError(grpc.StatusCode.DATA_LOSS, "prefill summary names "
                                          f"{msg.summary.num_tokens} tokens, {len(token_ids)} were sent")
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

    def _piece(self, msg: prefill_pb2.PrefillResponse, deadline: float) -> KvPiece:
        if not msg.HasField("chunk"):
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, "the prefill service sent KV out of band; "
                                  "this transport expects in-band chunks")
        return decode_chunk(msg.chunk)

    def close(self) -> None:
        self._channel.close()
