"""MACs of KV that travels out of band (NCCL, CUDA IPC): the bytes never touch the mTLS stream, only their
descriptors (`KvRemoteTensor`) do, so a descriptor carries the MAC of its tensor's bytes.

The prefill service that computed a tensor MACs it under the request's key (`zeroc.stream_mac.request_key`)
and puts the MAC in the descriptor; the decode service checks it on arrival, after the bytes landed in a
buffer of its own and before they are handed on to its cache. The MAC is the one an in-band chunk with
the same header fields and bytes carries (`zeroc.stream_mac.chunk_mac`), so both kinds of transfer are
held to one definition. Computing it takes the tensor's bytes to the host on both sides (a device-to-host
copy and HMAC-SHA256 over it, on the CPU): the cost the out-of-band transports otherwise avoid, measured
and weighed in docs/security.md ("KV sent out of band"). Without a cluster key there is no key and nothing
is MACed, as on the Prefill stream.
"""

from __future__ import annotations

import grpc
import torch
from torch import Tensor

from zeroc.kv_transfer import KvTransferError
from zeroc.stream_mac import check_chunk, chunk_mac
from zeroc.v1 import prefill_pb2


def host_bytes(t: Tensor) -> memoryview:
    """The bytes of `t` (any device, any shape), row-major, in host memory."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).cpu().numpy()) if flat.numel() else memoryview(b"")


def seal(key: bytes | None, desc: prefill_pb2.KvRemoteTensor, t: Tensor) -> prefill_pb2.KvRemoteTensor:
    """Set `desc.mac` to the MAC of `t`'s bytes and `desc`'s header fields under the request's `key` (None:
    no cluster key, no MAC). t: [tokens, kv_heads, width], the tensor `desc` describes. Returns `desc`."""
    if key is not None:
        desc.mac = chunk_mac(key, desc.layer, desc.tensor, desc.first_token, desc.shape, desc.dtype, host_bytes(t))
    return desc


def verify(key: bytes | None, desc: prefill_pb2.KvRemoteTensor, t: Tensor) -> None:
    """Raise KvTransferError(DATA_LOSS) unless `desc.mac` is the MAC of the received `t` under the request's
    `key` (None: no cluster key here, nothing checked). t: [tokens, kv_heads, width], already received."""
    if key is None:
        return
    where = f"out-of-band KV of layer {desc.layer} at token {desc.first_token}"
    if not desc.mac:
        raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"{where} carries no MAC: the prefill service has no "
                              "cluster key (ZEROC_SECURITY_CLUSTER_KEY, the same on every service) or predates "
                              "MACs of out-of-band KV")
    if not check_chunk(key, desc.layer, desc.tensor, desc.first_token, desc.shape, desc.dtype, host_bytes(t),
                       desc.mac):
        raise KvTransferError(grpc.StatusCode.DATA_LOSS, f"{where} failed its MAC check: altered on the way, or "
                              "not computed by a service of this deployment; its KV is not used")
