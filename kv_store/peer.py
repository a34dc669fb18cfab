"""Peer fetch: the `zeroc.v1.KvStoreService.FetchBlocks` server (every holder) and its client.

Blocks travel as the same CRC32C-checked `KvChunk`s as a prefill stream (`encode_layer` /
`decode_chunk` / `KvReceiver` of zeroc.kv_transfer), with prompt positions, straight into the
caller's reserved cache slots.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import grpc

from kv_store.pool import BlockPool
from zeroc.config import KvStoreConfig
from zeroc.tls import Tls, open_channel, require_service
from zeroc.kv_transfer import KvReceiver, KvTransferError, decode_chunk, encode_layer
from zeroc.v1 import kv_store_pb2, kv_store_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = kv_store_pb2.DESCRIPTOR.services_by_name["KvStoreService"].full_name
_BLOCK_ID_LEN = 32


_HEX = frozenset("0123456789abcdef")
_MAX_TOKEN = 2 ** 32 - 1  # chunk positions are uint32


class KvStoreServicer(kv_store_pb2_grpc.KvStoreServiceServicer):
    """Serves this holder's pool; UNAVAILABLE until `attach` (the model loads after the server starts)."""

    def __init__(self, default_chunk_bytes: int, max_message_bytes: int = 16 << 20,
                 cfg: KvStoreConfig | None = None, allow_plaintext: str = "loopback"):
        """allow_plaintext: the service's `SecurityConfig.allow_plaintext` (who may call without mTLS)."""
        cfg = cfg or KvStoreConfig()
        self.allow_plaintext = allow_plaintext
        self.default_chunk_bytes = default_chunk_bytes
        self.max_chunk_bytes = max(1024, max_message_bytes - (64 << 10))  # a chunk and its metadata fit a message
        self.max_blocks, self.max_bytes = cfg.max_fetch_blocks, cfg.max_fetch_mb << 20
        self.pool: BlockPool | None = None
        self.seed = ""
        self.on_served: Callable[[list[str]], None] = lambda ids: None  # the store marks served blocks used
        self.on_pins: Callable[[list[str]], None] = lambda ids: None  # ... and mirrors refcounts to the index

    def attach(self, pool: BlockPool, seed: str, on_served: Callable[[list[str]], None],
               on_pins: Callable[[list[str]], None]) -> None:
        self.seed, self.on_served, self.on_pins = seed, on_served, on_pins
        self.pool = pool

    def _check(self, request: kv_store_pb2.FetchBlocksRequest, pool: BlockPool, context: grpc.ServicerContext
               ) -> list[str]:
        """The request's block ids, or an abort: every number and length bounded before any work."""
        if request.seed != self.seed:  # the holder's seed is never quoted back
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the block seed does not match this holder's "
                                                               "(another model, dtype or block size?)")
        ids = list(request.block_ids)
        if not ids or len(ids) > self.max_blocks:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"block_ids has {len(ids)} ids; between 1 and "
                                                            f"{self.max_blocks} are allowed")
        if any(len(b) != _BLOCK_ID_LEN or not _HEX.issuperset(b) for b in ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"block_ids must be {_BLOCK_ID_LEN} lowercase hex "
                                                            "characters each")
        if len(set(ids)) != len(ids):  # a chain never repeats an id: repeats only multiply the reply
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "block_ids repeats an id; a block chain never does")
        if request.first_token + len(ids) * pool.block_size > _MAX_TOKEN:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"first_token {request.first_token} plus "
                                                            f"{len(ids)} blocks passes the largest token position")
        if len(ids) * pool.block_bytes > self.max_bytes:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(ids)} blocks are {len(ids) * pool.block_bytes} bytes; one call serves at most "
                          f"{self.max_bytes}")
        return ids

    def FetchBlocks(self, request, context):
        require_service(context, self.allow_plaintext)
        pool = self.pool
        if pool is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this service's KV store is not ready (or is off)")
        ids = self._check(request, pool, context)
        n = pool.pin(ids)
        served = ids[:n]
        self.on_pins(served)
        try:
            yield kv_store_pb2.FetchBlocksResponse(header=kv_store_pb2.FetchBlocksHeader(
                num_blocks=n, block_crc32c=[pool.checksum(b) for b in served], block_mac=[pool.mac(b) for b in served]))
            chunk = max(1024, min(request.max_chunk_bytes or self.default_chunk_bytes, self.max_chunk_bytes))
            for layer in range(len(pool.k) if n else 0):
                if not context.is_active():
                    return
                k, v = pool.read_layer(served, layer)
                for msg in encode_layer(layer, k, v, request.first_token, chunk):
                    yield kv_store_pb2.FetchBlocksResponse(chunk=msg)
        finally:
            pool.unpin(served)
            self.on_pins(served)
        self.on_served(served)


class PeerFetcher:
    """The client side: one channel per peer, kept open."""

    def __init__(self, seed: str, chunk_bytes: int, max_message_bytes: int, tls: Tls | None = None):
        self.seed, self.chunk_bytes, self.max_message_bytes = seed, chunk_bytes, max_message_bytes
        self.tls = tls
        self._stubs: dict[str, tuple[grpc.Channel, kv_store_pb2_grpc.KvStoreServiceStub]] = {}
        self._lock = threading.Lock()

    def _stub(self, peer: str) -> kv_store_pb2_grpc.KvStoreServiceStub:
        with self._lock:
            if peer not in self._stubs:
                channel = open_channel(peer, self.tls, options=[
                    ("grpc.max_receive_message_length", self.max_message_bytes),
                    ("grpc.max_send_message_length", self.max_message_bytes)])
                self._stubs[peer] = (channel, kv_store_pb2_grpc.KvStoreServiceStub(channel))
            return self._stubs[peer][1]

    def fetch(self, peer: str, block_ids: list[str], checksums: list[int], receiver_for: Callable[[int], KvReceiver],
              first_token: int, timeout_s: float) -> tuple[int, int, list[bytes]]:
        """Fetch blocks from `peer` into the receiver `receiver_for(num_blocks_served)` builds.

        Returns (blocks received, payload bytes, the MACs the peer claims for them: the caller checks
        them over the landed bytes). Raises KvTransferError when the peer is gone, sends bad data, or
        serves blocks whose checksums differ from the index's (`checksums`)."""
        request = kv_store_pb2.FetchBlocksRequest(block_ids=block_ids, seed=self.seed, first_token=first_token,
                                                  max_chunk_bytes=self.chunk_bytes)
        call = self._stub(peer).FetchBlocks(request, timeout=timeout_s)
        receiver: KvReceiver | None = None
        n, macs = 0, []
        try:
            for msg in call:
                if msg.HasField("header"):
                    n, macs = msg.header.num_blocks, list(msg.header.block_mac)
                    if n > len(block_ids) or len(macs) != n:
                        raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"peer {peer} sent a malformed header")
                    if list(msg.header.block_crc32c) != checksums[:n]:
                        raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"peer {peer} holds other data under "
                                                                         "the same block ids")
                    if n == 0:
                        call.cancel()
                        return 0, 0, []
                    receiver = receiver_for(n)
                elif receiver is None:
                    raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"peer {peer} sent KV before its header")
                else:
                    receiver.write(decode_chunk(msg.chunk))
        except grpc.RpcError as exc:
            raise KvTransferError(exc.code(), f"peer {peer}: {exc.details()}") from None
        except KvTransferError:
            call.cancel()
            raise
        if receiver is None:
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"peer {peer} ended without a header")
        receiver.check_complete()
        return n, receiver.bytes_received, macs

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._stubs.values():
                channel.close()
            self._stubs.clear()

