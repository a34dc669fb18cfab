"""The decode side of the out-of-band KV transports (the `KvTransport` seam of zeroc/kv_transfer.py).

`NegotiatingKvTransport` is what a decode service uses unless ``--kv-transport grpc``: on the
first request it swaps capabilities with the prefill service and then delegates to one of

- `GrpcKvTransport` (in-band chunks),
- `NcclKvTransport`: a 2-rank NCCL communicator (this side rank 0) set up over the
  `OpenKvLink` stream; the Prefill stream then carries only `KvRemoteTensor` descriptors and each
  tensor arrives by ncclRecv on a dedicated CUDA stream, in the order the prefill side sent them;
- `CudaIpcKvTransport`: the descriptors carry CUDA IPC handles into the prefill service's memory.

With a cluster key every descriptor carries the MAC of its tensor's bytes (zeroc/transport/integrity.py),
checked once the bytes are in a buffer of this service's own and before they go on to its cache.

Every wait is bounded by the request's transfer timeout; a timeout or a broken link aborts the
communicator (ncclCommAbort) and surfaces as a `KvTransferError` with a gRPC status.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Callable

import grpc
import torch

from zeroc.config import ZeroCConfig, ZeroCError
from zeroc.kv_transfer import (DTYPES_BY_NAME, KEY, VALUE, GrpcKvTransport, KvPiece, KvReceiver, KvTransferError,
                               KvTransport, WireChunk, tier_chunk)
from zeroc.stream_mac import stream_key
from zeroc.tls import Tls, is_loopback
from zeroc.transport import cuda_ipc
from zeroc.transport.integrity import verify
from zeroc.transport.capability import (CUDA_IPC, DECODE_RANK, GRPC, NCCL, PREFILL_RANK, Capability, choose,
                                        cuda_scope, kind_to_proto, probe)
from zeroc.transport.nccl import Communicator, NcclError, NcclLibrary, NcclTimeoutError, load_nccl
from zeroc.v1 import prefill_pb2

log = logging.getLogger(__name__)


# The prefill side refuses these before sending anything, so the link is still in step.
_REFUSED_BEFORE_SENDING = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                           grpc.StatusCode.RESOURCE_EXHAUSTED)


def remote_meta(r: prefill_pb2.KvRemoteTensor) -> tuple[torch.dtype, tuple[int, ...]]:
    """Check a descriptor's metadata; inconsistent metadata is DATA_LOSS."""
    dtype, shape = DTYPES_BY_NAME.get(r.dtype), tuple(r.shape)
    if dtype is None or len(shape) != 3 or r.tensor not in (KEY, VALUE):
        raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"KV descriptor has bad metadata (dtype={r.dtype!r}, "
                              f"shape={shape}, tensor={r.tensor})")
    need = shape[0] * shape[1] * shape[2] * torch.empty((), dtype=dtype).element_size()
    if need != r.nbytes:
        raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"KV descriptor announces {r.nbytes} bytes but shape "
                              f"{shape} of {r.dtype} needs {need}")
    return dtype, shape


def checked_piece(r: prefill_pb2.KvRemoteTensor, data: torch.Tensor, key: bytes | None) -> KvPiece:
    """The piece an out-of-band tensor makes once received into `data` ([tokens, kv_heads, width], this
    service's own buffer), its MAC checked under the request's `key` (None: not checked); DATA_LOSS if it fails."""
    verify(key, r, data)
    return KvPiece(r.layer, r.tensor == KEY, r.first_token, data)


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class _Link:
    """Rank 0 of a prefill/decode communicator, alive while its OpenKvLink stream is."""

    def __init__(self, link_id: str, comm: Communicator, call, stream: torch.cuda.Stream):
        self.id, self.comm, self.call, self.stream = link_id, comm, call, stream

    def watch(self) -> None:
        """Runs on its own thread: the stream's end (prefill gone, link closed) aborts the communicator."""
        try:
            for _ in self.call:
                pass
        except grpc.RpcError:
            pass
        self.comm.abort()

    def close(self) -> None:
        self.call.cancel()
        self.comm.abort()


class NcclKvTransport(GrpcKvTransport):
    """KV by ncclRecv from one prefill service; one cached link, one transfer on it at a time.

    NCCL matches a pair's sends and receives in order, so transfers on a link are serialised
    (the prefill side refuses a second one on a busy link); a failed transfer leaves the link
    out of step, so it is torn down and the next request opens a new one."""

    kind = NCCL

    def __init__(self, target: str, fingerprint: str, chunk_bytes: int, max_message_bytes: int,
                 device: torch.device, lib: NcclLibrary, tls: Tls | None = None, mac_key: bytes | None = None):
        super().__init__(target, fingerprint, chunk_bytes, max_message_bytes, tls, mac_key)
        self.device, self.lib = device, lib
        self._link: _Link | None = None
        self._busy = threading.Lock()

    def fetch(self, request_id: str, token_ids: list[int], receiver: KvReceiver, timeout_s: float,
              is_active: Callable[[], bool], cached_prefix_tokens: int = 0, tenant: str = "",
              priority: int = 0) -> int:
        deadline = time.monotonic() + timeout_s
        if not self._busy.acquire(timeout=timeout_s):
            raise KvTransferError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"the NCCL link to {self.target} stayed busy for {timeout_s:g} s")
        try:
            if self._link is None or not self._link.comm.alive:
                self._drop_link()
                self._link = self.open_link(deadline)
            try:
                return super().fetch(request_id, token_ids, receiver, _remaining(deadline), is_active,
                                     cached_prefix_tokens, tenant, priority)
            except KvTransferError as exc:
                if exc.code not in _REFUSED_BEFORE_SENDING:
                    self._drop_link()
                raise
        finally:
            self._busy.release()

    def open_link(self, deadline: float) -> _Link:
        """Create a unique id, have the prefill service join with it over OpenKvLink, join as rank 0."""
        link_id = uuid.uuid4().hex
        request = prefill_pb2.OpenKvLinkRequest(
            link_id=link_id, nccl_unique_id=self.lib.unique_id(), model_fingerprint=self.fingerprint,
            timeout_ms=max(1, int(_remaining(deadline) * 1000)))
        call = self._stub.OpenKvLink(request)  # no deadline: the stream lives as long as the link
        comm = None
        try:
            self._expect(call, prefill_pb2.KV_LINK_STATE_ACCEPTED, deadline)
            with cuda_scope(self.device):
                comm = Communicator(self.lib, request.nccl_unique_id, 2, DECODE_RANK)
                stream = torch.cuda.Stream(self.device)
            comm.wait_ready(_remaining(deadline))
            self._expect(call, prefill_pb2.KV_LINK_STATE_READY, deadline)
        except NcclError as exc:
            call.cancel()
            if comm is not None:
                comm.abort()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(exc, NcclTimeoutError) else \
                grpc.StatusCode.FAILED_PRECONDITION
            raise KvTransferError(code, f"NCCL link to {self.target}: {exc}") from None
        except KvTransferError:
            call.cancel()
            if comm is not None:
                comm.abort()
            raise
        link = _Link(link_id, comm, call, stream)
        threading.Thread(target=link.watch, name=f"kv-link-{link_id[:8]}", daemon=True).start()
        log.info("nccl link up", extra={"peer": self.target, "link": link_id, "nccl": str(self.lib.version)})
        return link

    def _expect(self, call, state: int, deadline: float) -> None:
        """Wait (bounded) for the OpenKvLink stream's next message, which must be `state`."""
        got: list = []

        def read() -> None:
            try:
                got.append(next(call))
            except StopIteration:
                got.append(None)
            except grpc.RpcError as exc:
                got.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(_remaining(deadline))
        name = prefill_pb2.KvLinkState.Name(state)
        if not got:
            raise KvTransferError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"NCCL link to {self.target}: no {name} before the transfer deadline")
        if isinstance(got[0], grpc.RpcError):
            raise KvTransferError(got[0].code(), f"NCCL link to {self.target}: {got[0].details()}")
        if got[0] is None or got[0].state != state:
            raise KvTransferError(grpc.StatusCode.UNAVAILABLE,
                                  f"NCCL link to {self.target}: the stream ended before {name}")

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def _extend(self, request: prefill_pb2.PrefillRequest) -> prefill_pb2.PrefillRequest:
        request.transport = kind_to_proto(NCCL)
        request.link_id = self._link.id
        return request

    def _piece(self, msg: prefill_pb2.PrefillResponse, deadline: float, key: bytes | None) -> KvPiece:
        if isinstance(msg, WireChunk):  # a token tier's few rows travel in band beside the out-of-band KV
            return tier_chunk(msg, key)
        if not isinstance(msg, prefill_pb2.PrefillResponse) or not msg.HasField("remote"):
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, "expected NCCL KV descriptors, got an in-band chunk")
        r = msg.remote
        dtype, shape = remote_meta(r)
        link = self._link
        buf = torch.empty(r.nbytes, dtype=torch.uint8, device=self.device)
        try:
            with torch.cuda.device(self.device):
                link.comm.recv(buf.data_ptr(), r.nbytes, PREFILL_RANK, link.stream.cuda_stream, _remaining(deadline))
                done = torch.cuda.Event()
                done.record(link.stream)
            # Wait here, not on the compute stream: a receive that never completes must not stall decoding.
            link.comm.poll(done.query, _remaining(deadline), f"ncclRecv of layer {r.layer}")
        except NcclTimeoutError as exc:
            raise KvTransferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"NCCL link to {self.target}: {exc}") from None
        except NcclError as exc:
            raise KvTransferError(grpc.StatusCode.UNAVAILABLE, f"NCCL link to {self.target}: {exc}") from None
        return checked_piece(r, buf.view(dtype).view(shape), key)

    def close(self) -> None:
        self._drop_link()
        super().close()


class CudaIpcKvTransport(GrpcKvTransport):
    """KV by CUDA IPC handles from a prefill service on the same GPU."""

    kind = CUDA_IPC

    def __init__(self, target: str, fingerprint: str, chunk_bytes: int, max_message_bytes: int,
                 device: torch.device, tls: Tls | None = None, mac_key: bytes | None = None):
        super().__init__(target, fingerprint, chunk_bytes, max_message_bytes, tls, mac_key)
        self.device = device

    def _extend(self, request: prefill_pb2.PrefillRequest) -> prefill_pb2.PrefillRequest:
        request.transport = kind_to_proto(CUDA_IPC)
        return request

    def _piece(self, msg: prefill_pb2.PrefillResponse, deadline: float, key: bytes | None) -> KvPiece:
        if isinstance(msg, WireChunk):  # a token tier's rows, in band
            return tier_chunk(msg, key)
        if not isinstance(msg, prefill_pb2.PrefillResponse) or not msg.HasField("remote") \
                or not msg.remote.HasField("ipc"):
            raise KvTransferError(grpc.StatusCode.DATA_LOSS, "expected CUDA IPC KV descriptors")
        r = msg.remote
        dtype, shape = remote_meta(r)
        try:
            shared = cuda_ipc.open_shared(r.ipc, shape, dtype, self.device)
            # A private copy, finished before the mapping is dropped: dropping it lets the producer reuse the block.
            data = shared.clone()
            torch.cuda.current_stream(self.device).synchronize()
        except RuntimeError as exc:  # cudaIpcOpenMemHandle failures and the like
            raise KvTransferError(grpc.StatusCode.UNAVAILABLE, f"CUDA IPC from {self.target}: {exc}") from None
        del shared
        return checked_piece(r, data, key)


class NegotiatingKvTransport(KvTransport):
    """Picks grpc, NCCL or CUDA IPC with the prefill service on first use (``--kv-transport auto|nccl``)."""

    def __init__(self, target: str, fingerprint: str, chunk_bytes: int, max_message_bytes: int, setting: str,
                 local: Capability, device: torch.device, lib: NcclLibrary | None, tls: Tls | None = None,
                 mac_key: bytes | None = None, out_of_band_mac: bool = True):
        self.target, self.setting, self.local, self.device, self.lib = target, setting, local, device, lib
        self._args = (target, fingerprint, chunk_bytes, max_message_bytes)
        self._tls, self._mac_key = tls, mac_key
        self._oob_key = mac_key if out_of_band_mac else None  # checks out-of-band KV; None: trusts the fabric
        self._grpc = GrpcKvTransport(*self._args, tls, mac_key)
        self._chosen: tuple[str, KvTransport] | None = None
        self._lock = threading.Lock()

    @property
    def kind(self) -> str | None:
        """The transport in use, None before the first request."""
        return self._chosen[0] if self._chosen else None

    def negotiate(self, timeout_s: float) -> tuple[str, KvTransport]:
        """Swap capabilities with the prefill service (unless this side has no GPU) and pick a transport."""
        with self._lock:
            if self._chosen is None:
                kind = GRPC
                if self.local.cuda:
                    kind = choose(self.setting, self.local, self._remote_capability(timeout_s), self.target)
                self._chosen = (kind, self._make(kind))
                log.info("kv transport chosen", extra={"peer": self.target, "transport": kind,
                                                       "setting": self.setting})
            return self._chosen

    def _remote_capability(self, timeout_s: float) -> Capability:
        request = prefill_pb2.GetKvCapabilityRequest(capability=self.local.to_proto())
        try:
            reply = self._grpc._stub.GetKvCapability(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older prefill service: in-band only
                return Capability(cuda=False, why_not="it predates out-of-band KV transports")
            raise KvTransferError(exc.code(), f"prefill service {self.target}: {exc.details()}") from None
        return Capability.from_proto(reply.capability)

    def _make(self, kind: str) -> KvTransport:
        if kind == NCCL:
            return NcclKvTransport(*self._args, self.device, self.lib, self._tls, self._oob_key)
        if kind == CUDA_IPC:
            return CudaIpcKvTransport(*self._args, self.device, self._tls, self._oob_key)
        return self._grpc

    def fetch(self, request_id: str, token_ids: list[int], receiver: KvReceiver, timeout_s: float,
              is_active: Callable[[], bool], cached_prefix_tokens: int = 0, tenant: str = "",
              priority: int = 0) -> int:
        deadline = time.monotonic() + timeout_s
        kind, transport = self.negotiate(timeout_s)
        try:
            return transport.fetch(request_id, token_ids, receiver, _remaining(deadline), is_active,
                                   cached_prefix_tokens, tenant, priority)
        except KvTransferError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:  # the peer may be back elsewhere: negotiate again
                self._forget()
            if exc.code != grpc.StatusCode.FAILED_PRECONDITION or kind == GRPC or self.setting != "auto":
                raise
            # auto promised gRPC whenever out-of-band cannot work: use it from now on with this peer.
            log.warning("kv transport falls back to grpc", extra={"peer": self.target, "error": str(exc)})
            self._forget(fallback=True)
        return self._grpc.fetch(request_id, token_ids, receiver, _remaining(deadline), is_active,
                                cached_prefix_tokens, tenant, priority)

    def _forget(self, fallback: bool = False) -> None:
        with self._lock:
            chosen, self._chosen = self._chosen, ((GRPC, self._grpc) if fallback else None)
        if chosen is not None and chosen[1] is not self._grpc:
            chosen[1].close()

    def close(self) -> None:
        self._forget()
        self._grpc.close()


def make_kv_transport(cfg: ZeroCConfig, fingerprint: str) -> KvTransport:
    """The decode service's transport to `cfg.transfer.prefill_target`, per ``--kv-transport``.

    Raises ZeroCError (the CLI exits 2) when nccl is demanded and this side cannot do it."""
    t = cfg.transfer
    args = (t.prefill_target, fingerprint, t.chunk_bytes, cfg.server.max_message_mb << 20)
    tls = Tls.from_config(cfg.security)
    if t.kv_transport == "grpc":
        return GrpcKvTransport(*args, tls, _stream_mac_key(cfg))
    local = probe(cfg.device, t.kv_transport)  # impossible settings fail here, before any warning is logged
    lib = load_nccl() if local.nccl_version else None
    return NegotiatingKvTransport(*args, t.kv_transport, local, torch.device(cfg.device), lib, tls,
                                  _stream_mac_key(cfg), cfg.security.out_of_band_mac == "on")


def _stream_mac_key(cfg: ZeroCConfig) -> bytes | None:
    """The key that checks the MACs of the prefill stream's chunks (zeroc.stream_mac). Without a cluster key
    none is checked: allowed only for a prefill service on loopback (or where plaintext is allowed anywhere),
    as plaintext gRPC is, and logged."""
    key = stream_key(cfg.security)
    if key is None:
        target = cfg.transfer.prefill_target
        if not is_loopback(target.rsplit(":", 1)[0]) and cfg.security.allow_plaintext != "any":
            raise ZeroCError(f"--prefill {target} is not on loopback: set ZEROC_SECURITY_CLUSTER_KEY (the same on "
                             "every service) so this decode service can check the KV its prefill service sends")
        log.warning("no cluster key: KV from the prefill service is not authenticated (only its CRC is checked)",
                    extra={"peer": target})
    return key
