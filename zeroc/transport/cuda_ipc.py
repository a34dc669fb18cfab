"""CUDA IPC handles for KV tensors, carried in `zeroc.v1.CudaIpcHandle` messages.

Two processes on one GPU (a prefill and a decode service sharing a card) cannot form an NCCL
communicator, but one can map the other's memory. This uses torch's own CUDA tensor reduction
(the machinery of `torch.multiprocessing`), so torch's IPC reference counting keeps the
producer's block alive until the consumer has dropped its mapping, and its IPC event orders the
consumer's reads after the producer's writes. The fields travel explicitly in protobuf; nothing
is pickled.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.multiprocessing.reductions import reduce_tensor, rebuild_cuda_tensor

from zeroc.v1 import prefill_pb2


def share(t: Tensor) -> prefill_pb2.CudaIpcHandle:
    """Export a CUDA tensor (producer side). The caller keeps `t` alive until the job ends."""
    if t.device.type != "cuda":
        raise ValueError(f"CUDA IPC shares CUDA tensors, got one on {t.device}")
    _, args = reduce_tensor(t)
    (_cls, _size, stride, offset, _storage_cls, _dtype, _device, handle, size_bytes, offset_bytes, _grad,
     ref_handle, ref_offset, event_handle, event_sync) = args
    return prefill_pb2.CudaIpcHandle(
        storage_handle=handle, storage_size_bytes=size_bytes, storage_offset_bytes=offset_bytes,
        ref_counter_handle=ref_handle, ref_counter_offset=ref_offset, event_handle=event_handle or b"",
        event_sync_required=bool(event_sync), tensor_offset=offset, stride=list(stride))


def open_shared(h: prefill_pb2.CudaIpcHandle, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """Map a tensor another process on this GPU shared (consumer side). -> [shape] on `device`.

    Drop the result only after the reads queued on it have finished: its release tells the
    producer that the memory may be reused."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(shape), tuple(h.stride), h.tensor_offset, torch.UntypedStorage, dtype, index,
        h.storage_handle, h.storage_size_bytes, h.storage_offset_bytes, False, h.ref_counter_handle,
        h.ref_counter_offset, h.event_handle or None, h.event_sync_required)
