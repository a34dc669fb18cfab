"""The prefill side of the out-of-band KV transports.

`KvTransportService` is the prefill servicer's out-of-band half: it answers `GetKvCapability`,
keeps the NCCL links decode services open with `OpenKvLink` (rank 1 of each 2-rank
communicator; a link lives exactly as long as its OpenKvLink stream), and gives each Prefill
request that asks for NCCL or CUDA IPC a `KvSink` that ships the job's KV out of band while the
Prefill stream carries only `KvRemoteTensor` descriptors.
"""

from __future__ import annotations

import abc
import logging
import threading

import grpc
import torch
from torch import Tensor

from zeroc.kv_transfer import DTYPE_NAMES, KEY, VALUE, KvTransferError
from zeroc.rpc import quote
from zeroc.transport import cuda_ipc
from zeroc.transport.integrity import seal
from zeroc.transport.capability import (CUDA_IPC, DECODE_RANK, NCCL, PREFILL_RANK, Capability, cuda_scope,
                                        kind_to_proto)
from zeroc.transport.nccl import UNIQUE_ID_BYTES, Communicator, NcclError, NcclLibrary, NcclTimeoutError
from zeroc.v1 import prefill_pb2

log = logging.getLogger(__name__)


def describe(layer: int, kind: int, t: Tensor, first_token: int) -> prefill_pb2.KvRemoteTensor:
    """The descriptor of one layer's keys or values. t: [tokens, kv_heads, width] from `first_token` on."""
    return prefill_pb2.KvRemoteTensor(layer=layer, tensor=kind, first_token=first_token, shape=list(t.shape),
                                      dtype=DTYPE_NAMES[t.dtype], nbytes=t.numel() * t.element_size())


class KvSink(abc.ABC):
    """Where one Prefill job's KV goes when it travels out of band (prefill side).

    The prefill worker thread calls `layer` as each layer is computed and puts the messages it
    returns on the Prefill stream; the servicer thread calls `finish` before the summary (it
    raises KvTransferError if the KV did not get out) and `close` however the job ended. Every
    descriptor carries the MAC of its tensor under the request's `mac_key` (None: no cluster key)."""

    kind = ""  # the transport's name (zeroc.transport.capability), for the metrics' transport label

    def __init__(self, mac_key: bytes | None = None):
        self.mac_key = mac_key

    @abc.abstractmethod
    def layer(self, layer: int, k: Tensor, v: Tensor, first_token: int) -> list[prefill_pb2.PrefillResponse]:
        """Ship one layer. k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim]: the job's own rows from
        prompt position `first_token` on (the decode side has the cached prefix before it)."""

    def finish(self, timeout_s: float) -> None:
        """Block until everything shipped has been delivered."""

    def close(self) -> None:
        """Release what the job held."""


class CudaIpcSink(KvSink):
    """KV as CUDA IPC handles; the decode service on the same GPU copies it out itself."""

    kind = CUDA_IPC

    def __init__(self, mac_key: bytes | None = None) -> None:
        super().__init__(mac_key)
        self._held: list[Tensor] = []

    def layer(self, layer: int, k: Tensor, v: Tensor, first_token: int) -> list[prefill_pb2.PrefillResponse]:
        out = []
        for kind, t in ((KEY, k), (VALUE, v)):
            t = t.clone()  # a block of its own, not a view into the batch's activations
            self._held.append(t)
            msg = seal(self.mac_key, describe(layer, kind, t, first_token), t)
            msg.ipc.CopyFrom(cuda_ipc.share(t))
            out.append(prefill_pb2.PrefillResponse(remote=msg))
        return out

    def close(self) -> None:
        # torch's IPC reference counts keep any block the decode side still maps; the rest is freed.
        self._held.clear()
        torch.cuda.ipc_collect()


class PrefillLink:
    """Rank 1 of a communicator with one decode service, and the CUDA stream its sends go on."""

    def __init__(self, link_id: str, comm: Communicator, stream: torch.cuda.Stream, peer: str):
        self.id, self.comm, self.stream, self.peer = link_id, comm, stream, peer
        self.busy = threading.Lock()
        self.ended = threading.Event()

    def end(self) -> None:
        self.comm.abort()
        self.ended.set()


class NcclSink(KvSink):
    """KV by ncclSend on a link held for the whole job (NCCL pairs sends and receives in order)."""

    kind = NCCL

    def __init__(self, link: PrefillLink, device: torch.device, mac_key: bytes | None = None):
        super().__init__(mac_key)
        self.link, self.device = link, device
        self._pending: list[Tensor] = []
        self._delivered = False

    def layer(self, layer: int, k: Tensor, v: Tensor, first_token: int) -> list[prefill_pb2.PrefillResponse]:
        out = []
        with torch.cuda.device(self.device):
            parts = [(KEY, k.contiguous()), (VALUE, v.contiguous())]
            # k, v, and contiguous()'s copies when it makes one, come from the compute stream: the sends wait
            # for it (waiting before those copies were queued would let a send read a copy not yet made).
            self.link.stream.wait_stream(torch.cuda.current_stream(self.device))
            for kind, t in parts:
                self._pending.append(t)  # kept alive until `finish` has seen the send complete
                msg = seal(self.mac_key, describe(layer, kind, t, first_token), t)
                try:
                    self.link.comm.send(t.data_ptr(), msg.nbytes, DECODE_RANK, self.link.stream.cuda_stream)
                except NcclError as exc:
                    raise KvTransferError(grpc.StatusCode.UNAVAILABLE, f"NCCL link {self.link.id}: {exc}") from None
                out.append(prefill_pb2.PrefillResponse(remote=msg))
        return out

    def finish(self, timeout_s: float) -> None:
        try:
            with torch.cuda.device(self.device):
                done = torch.cuda.Event()
                done.record(self.link.stream)
            self.link.comm.poll(done.query, timeout_s, "ncclSend of the KV")
        except NcclTimeoutError as exc:
            raise KvTransferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"NCCL link {self.link.id}: {exc}") from None
        except NcclError as exc:
            raise KvTransferError(grpc.StatusCode.UNAVAILABLE, f"NCCL link {self.link.id}: {exc}") from None
        self._delivered = True

    def close(self) -> None:
        if not self._delivered and self._pending:
            # Sends the decode side will never match: the link is out of step for good.
            log.warning("nccl link torn down after an incomplete transfer", extra={"link": self.link.id})
            self.link.end()
        self._pending.clear()
        if self.link.busy.locked():
            self.link.busy.release()


class KvTransportService:
    """GetKvCapability, OpenKvLink and the per-request sinks of a prefill service."""

    def __init__(self, capability: Capability, device: torch.device, lib: NcclLibrary | None,
                 draining: threading.Event, max_links: int = 64, out_of_band_mac: bool = True):
        self.capability, self.device, self.lib, self.draining = capability, device, lib, draining
        self.out_of_band_mac = out_of_band_mac  # False: out-of-band KV goes unMACed (the fabric is trusted)
        self.max_links = max_links
        self.fingerprint: str | None = None  # set once the model has loaded
        self._links: dict[str, PrefillLink] = {}
        self._lock = threading.Lock()

    @property
    def open_links(self) -> int:
        with self._lock:
            return len(self._links)

    # -- RPCs ----------------------------------------------------------------------------------------
    def get_capability(self, request: prefill_pb2.GetKvCapabilityRequest, context) -> prefill_pb2.GetKvCapabilityResponse:
        return prefill_pb2.GetKvCapabilityResponse(capability=self.capability.to_proto())

    def open_link(self, request: prefill_pb2.OpenKvLinkRequest, context, default_timeout_s: float):
        """The body of OpenKvLink: check, ACCEPTED, join as rank 1, READY, then hold the link open."""
        self._check_open(request, context)
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else default_timeout_s
        yield prefill_pb2.OpenKvLinkResponse(state=prefill_pb2.KV_LINK_STATE_ACCEPTED)
        try:
            with cuda_scope(self.device):
                comm = Communicator(self.lib, request.nccl_unique_id, 2, PREFILL_RANK)
                stream = torch.cuda.Stream(self.device)
            comm.wait_ready(timeout_s)
        except NcclTimeoutError as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except NcclError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        link = PrefillLink(request.link_id, comm, stream, context.peer())
        with self._lock:
            self._links[link.id] = link
        context.add_callback(lambda: self._remove(link))  # the caller gone, cancelled or closed
        log.info("nccl link up", extra={"link": link.id, "peer": link.peer})
        yield prefill_pb2.OpenKvLinkResponse(state=prefill_pb2.KV_LINK_STATE_READY,
                                             nccl_version=str(self.lib.version))
        while context.is_active() and not self.draining.is_set() and link.comm.alive:
            link.ended.wait(0.5)
        self._remove(link)

    def _check_open(self, request: prefill_pb2.OpenKvLinkRequest, context) -> None:
        if NCCL not in self.capability.transports:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this prefill service does not offer NCCL: {self.capability.why_not or '--kv-transport grpc'}")
        if self.fingerprint is None or self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading or the service is shutting down")
        if request.model_fingerprint and request.model_fingerprint != self.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model fingerprint {quote(request.model_fingerprint)} "
                          f"does not match this service's {self.fingerprint}")
        if len(request.nccl_unique_id) != UNIQUE_ID_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"nccl_unique_id has {len(request.nccl_unique_id)} "
                          f"bytes; NCCL unique ids have {UNIQUE_ID_BYTES}")
        with self._lock:
            if not request.link_id or request.link_id in self._links:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"link_id {quote(request.link_id)} is empty or in use")
            if len(self._links) >= self.max_links:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(self._links)} NCCL links are open "
                              f"(limit {self.max_links})")

    def _remove(self, link: PrefillLink) -> None:
        with self._lock:
            if self._links.get(link.id) is link:
                del self._links[link.id]
                log.info("nccl link closed", extra={"link": link.id})
        link.end()

    # -- Prefill requests ----------------------------------------------------------------------------
    def sink_for(self, request: prefill_pb2.PrefillRequest, mac_key: bytes | None = None) -> KvSink | None:
        """The sink a Prefill request asked for (None: in-band chunks), MACing under the request's `mac_key`;
        KvTransferError if it cannot have it."""
        mac_key = mac_key if self.out_of_band_mac else None
        kind = request.transport
        if kind not in prefill_pb2.KvTransportKind.values():  # proto3 enums are open: any int arrives
            raise KvTransferError(grpc.StatusCode.INVALID_ARGUMENT, f"transport {kind} is not a KvTransportKind "
                                  "this service knows")
        if kind in (prefill_pb2.KV_TRANSPORT_KIND_UNSPECIFIED, prefill_pb2.KV_TRANSPORT_KIND_GRPC):
            return None
        if kind == kind_to_proto(CUDA_IPC) and CUDA_IPC in self.capability.transports:
            return CudaIpcSink(mac_key)
        if kind == kind_to_proto(NCCL) and NCCL in self.capability.transports:
            with self._lock:
                link = self._links.get(request.link_id)
            if link is None or not link.comm.alive:
                raise KvTransferError(grpc.StatusCode.FAILED_PRECONDITION,
                                      f"no NCCL link {quote(request.link_id)}; open one with OpenKvLink")
            if not link.busy.acquire(blocking=False):
                raise KvTransferError(grpc.StatusCode.ABORTED, f"NCCL link {quote(request.link_id)} is already "
                                      "carrying a transfer")
            return NcclSink(link, self.device, mac_key)
        raise KvTransferError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"this prefill service does not offer {prefill_pb2.KvTransportKind.Name(kind)}: "
                              f"{self.capability.why_not or '--kv-transport grpc'}")

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.end()
