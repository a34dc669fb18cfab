"""Which KV transport a prefill/decode pair uses, from each side's capability."""

from __future__ import annotations

import grpc
import pytest
import torch

from zeroc.config import ZeroCError
from zeroc.kv_transfer import KvTransferError
from zeroc.transport.capability import CUDA_IPC, GRPC, NCCL, Capability, choose, host_id, probe

HOST = host_id()
GPU_A = Capability(cuda=True, device_uuid="GPU-a", host_id=HOST, nccl_version="2.32.3",
                   transports=(GRPC, CUDA_IPC, NCCL))
GPU_B = Capability(cuda=True, device_uuid="GPU-b", host_id=HOST, nccl_version="2.32.3",
                   transports=(GRPC, CUDA_IPC, NCCL))
CPU = Capability(cuda=False, host_id=HOST, why_not="the model runs on cpu (--device)")


@pytest.mark.parametrize("setting, local, remote, expected", [
    ("auto", GPU_A, GPU_B, NCCL),  # two GPUs of one host
    ("auto", GPU_A, Capability(**{**vars(GPU_B), "device_uuid": "GPU-a", "host_id": "other/host"}), NCCL),
    ("auto", GPU_A, Capability(**{**vars(GPU_A)}), CUDA_IPC),  # one GPU: NCCL would refuse, IPC instead
    ("nccl", GPU_A, Capability(**{**vars(GPU_A)}), CUDA_IPC),
    ("nccl", GPU_A, GPU_B, NCCL),
    ("auto", GPU_A, CPU, GRPC),  # fallback: the peer has no GPU
    ("auto", CPU, GPU_A, GRPC),
    ("auto", GPU_A, Capability(**{**vars(GPU_B), "transports": (GRPC, CUDA_IPC), "nccl_version": ""}), GRPC),
    ("grpc", GPU_A, GPU_B, GRPC),  # never leaves the gRPC stream when told so
])
def test_choice(setting, local, remote, expected):
    assert choose(setting, local, remote) == expected


def test_demanding_nccl_from_a_peer_without_it_is_a_failed_precondition_naming_why():
    with pytest.raises(KvTransferError) as err:
        choose("nccl", GPU_A, CPU, peer="prefill 10.0.0.7:50051")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "prefill 10.0.0.7:50051" in str(err.value) and "runs on cpu" in str(err.value)


def test_capability_round_trips_through_protobuf():
    for cap in (GPU_A, CPU):
        assert Capability.from_proto(cap.to_proto()) == cap


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what the probe reports on a machine without CUDA")
def test_probe_on_a_cpu_machine():
    auto = probe("cpu", "auto")
    assert not auto.cuda and auto.transports == (GRPC,) and "cpu" in auto.why_not
    assert auto.host_id == HOST
    assert probe("cpu", "grpc").transports == (GRPC,)
    with pytest.raises(ZeroCError, match="--kv-transport nccl needs a CUDA device"):
        probe("cpu", "nccl")
    with pytest.raises(ZeroCError, match="torch sees no CUDA device"):
        probe("cuda:0", "nccl")
    with pytest.raises(ValueError, match="grpc, nccl, auto"):
        probe("cpu", "rdma")
