"""What a service can do for KV transfer, and which transport a prefill/decode pair uses.

Each side probes its own `Capability` at startup (`probe`); the decode side asks the prefill
side for its capability over gRPC (`PrefillService.GetKvCapability`) and `choose` picks:

- ``grpc``: in-band `KvChunk`s, on any machine;
- ``cuda-ipc``: both services on the same GPU of the same host (NCCL refuses two ranks on one
  GPU with "Duplicate GPU detected", so a same-device pair shares memory handles instead);
- ``nccl``: both on GPUs with libnccl, different devices.

The ``--kv-transport`` setting: ``grpc`` never leaves the gRPC stream; ``nccl`` demands an
out-of-band transport (a CPU-only service refuses to start, a pair that cannot do it fails its
requests with FAILED_PRECONDITION); ``auto`` uses one when both peers can and gRPC otherwise.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from zeroc.config import ZeroCError
from zeroc.kv_transfer import KvTransferError
from zeroc.transport.nccl import NcclNotFoundError, load_nccl
from zeroc.v1 import prefill_pb2

KV_TRANSPORT_SETTINGS = ("grpc", "nccl", "auto")
GRPC, NCCL, CUDA_IPC = "grpc", "nccl", "cuda-ipc"
DECODE_RANK, PREFILL_RANK = 0, 1  # in each pair's NCCL communicator; rank 0 creates the unique id
_KINDS = {GRPC: prefill_pb2.KV_TRANSPORT_KIND_GRPC, NCCL: prefill_pb2.KV_TRANSPORT_KIND_NCCL,
          CUDA_IPC: prefill_pb2.KV_TRANSPORT_KIND_CUDA_IPC}
_NAMES = {v: k for k, v in _KINDS.items()}


def kind_to_proto(kind: str) -> int:
    return _KINDS[kind]


@dataclass(frozen=True)
class Capability:
    """One service's side of the negotiation."""

    cuda: bool
    device_uuid: str = ""
    host_id: str = ""
    nccl_version: str = ""  # empty: no usable libnccl
    transports: tuple[str, ...] = (GRPC,)  # what it accepts, GRPC always
    why_not: str = ""  # why the out-of-band transports are missing, for error messages

    def to_proto(self) -> prefill_pb2.KvCapability:
        return prefill_pb2.KvCapability(cuda=self.cuda, device_uuid=self.device_uuid, host_id=self.host_id,
                                        nccl_version=self.nccl_version, why_not=self.why_not,
                                        transports=[_KINDS[t] for t in self.transports])

    @classmethod
    def from_proto(cls, msg: prefill_pb2.KvCapability) -> "Capability":
        kinds = tuple(_NAMES[t] for t in msg.transports if t in _NAMES)
        return cls(msg.cuda, msg.device_uuid, msg.host_id, msg.nccl_version, kinds or (GRPC,), msg.why_not)


def host_id() -> str:
    """This host's boot id and name: equal on two processes of one (booted) machine only."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{boot.read_text().strip() if boot.exists() else ''}/{socket.gethostname()}"


def cuda_scope(device):
    """Make `device` current (NCCL joins communicators on the current device). Without CUDA in torch
    this is a no-op, so that NCCL itself reports the missing device, in its own words."""
    import torch

    return torch.cuda.device(device) if torch.cuda.is_available() else contextlib.nullcontext()


def check_setting(setting: str) -> str:
    if setting not in KV_TRANSPORT_SETTINGS:
        raise ValueError(f"kv_transport must be one of {', '.join(KV_TRANSPORT_SETTINGS)}, got {setting!r}")
    return setting


def probe(device: str, setting: str, env: dict[str, str] | None = None) -> Capability:
    """This process's capability for a model on `device`. With setting "nccl", a service that
    cannot do NCCL or CUDA IPC raises ZeroCError (the CLI exits 2) instead of starting."""
    import torch

    check_setting(setting)
    dev = torch.device(device)
    cuda, uuid, nccl_version, why = False, "", "", []
    if dev.type != "cuda":
        why.append(f"the model runs on {dev.type} (--device)")
    elif not torch.cuda.is_available():
        why.append("torch sees no CUDA device")
    else:
        cuda = True
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
    try:
        nccl_version = str(load_nccl(env).version)
    except NcclNotFoundError as exc:
        why.append(str(exc))
    transports = [GRPC]
    if cuda and setting != "grpc":
        transports.append(CUDA_IPC)
        if nccl_version:
            transports.append(NCCL)
    if setting == "nccl" and len(transports) == 1:
        raise ZeroCError("--kv-transport nccl needs a CUDA device and libnccl: " + "; ".join(why))
    return Capability(cuda, uuid, host_id(), nccl_version, tuple(transports), "; ".join(why))


def choose(setting: str, local: Capability, remote: Capability, peer: str = "the prefill service") -> str:
    """The transport a decode service (`local`) uses with its prefill service (`remote`)."""
    check_setting(setting)
    if setting == "grpc":
        return GRPC
    same_gpu = local.cuda and remote.cuda and local.host_id == remote.host_id \
        and local.device_uuid == remote.device_uuid
    if same_gpu and CUDA_IPC in local.transports and CUDA_IPC in remote.transports:
        return CUDA_IPC
    if not same_gpu and NCCL in local.transports and NCCL in remote.transports:
        return NCCL
    if setting == "auto":
        return GRPC
    theirs = ", ".join(remote.transports) + (f" ({remote.why_not})" if remote.why_not else "")
    raise KvTransferError(grpc.StatusCode.FAILED_PRECONDITION,
                          f"--kv-transport nccl: {peer} cannot receive KV over NCCL or CUDA IPC from this "
                          f"service; it offers {theirs}")
