"""MACs of out-of-band KV (NCCL, CUDA IPC), on the CPU: the descriptor a prefill-side sink sends carries the
MAC of its tensor, and the decode side's check (`checked_piece`, what both out-of-band transports run on a
received tensor before it goes on to the cache) refuses altered bytes, altered descriptors, missing MACs
and other keys. Moving the bytes needs a GPU (benchmarks/gpu_nccl.py runs the real links, whose services
share a cluster key, so MACs are made and checked there); the MAC path is the same code on any device."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from zeroc.config import ZeroCConfig
from zeroc.kv_transfer import KEY, VALUE, KvTransferError, encode_layer
from zeroc.stream_mac import request_key
from zeroc.transport.capability import CUDA_IPC, GRPC, Capability, kind_to_proto
from zeroc.transport.decode_side import NegotiatingKvTransport, checked_piece
from zeroc.transport.integrity import seal
from zeroc.transport.prefill_side import KvTransportService, describe
from zeroc.v1 import prefill_pb2

KEY_A = request_key(b"a" * 32, "req-1", [5, 6, 7, 8], 0)


@pytest.fixture(params=[torch.float32, torch.bfloat16])
def sent(request):
    """(descriptor, tensor) as a sink ships them: layer 3's values for tokens 16.. of a prompt."""
    t = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(0)).to(request.param)
    return seal(KEY_A, describe(3, VALUE, t, 16), t), t


def test_the_mac_is_the_in_band_chunks_for_the_same_rows(sent):
    desc, t = sent
    k = torch.zeros_like(t)
    in_band, = [c for c in encode_layer(3, k, t, 16, 1 << 20, KEY_A) if c.tensor == VALUE]
    assert len(desc.mac) == 16 and desc.mac == in_band.mac


def test_received_intact_it_becomes_a_piece(sent):
    desc, t = sent
    received = t.clone()  # the decode side's own buffer
    piece = checked_piece(desc, received, KEY_A)
    assert piece.layer == 3 and not piece.is_key and piece.first_token == 16 and torch.equal(piece.data, t)


def _data_loss(desc, t, key, words: str) -> None:
    with pytest.raises(KvTransferError) as err:
        checked_piece(desc, t, key)
    assert err.value.code == grpc.StatusCode.DATA_LOSS and words in str(err.value)


def test_altered_bytes_descriptors_missing_macs_and_other_keys_are_refused(sent):
    desc, t = sent
    flipped = t.clone()
    flipped.view(-1).view(torch.uint8)[7] ^= 1  # one bit of one element
    _data_loss(desc, flipped, KEY_A, "failed its MAC check")
    for field, value in (("first_token", 0), ("layer", 2), ("tensor", KEY)):  # the bytes moved elsewhere
        other = type(desc)()
        other.CopyFrom(desc)
        setattr(other, field, value)
        _data_loss(other, t, KEY_A, "failed its MAC check")
    _data_loss(desc, t, request_key(b"a" * 32, "req-2", [5, 6, 7, 8], 0), "failed its MAC check")  # another request
    _data_loss(desc, t, request_key(b"b" * 32, "req-1", [5, 6, 7, 8], 0), "failed its MAC check")  # another cluster
    bare = describe(3, VALUE, t, 16)
    _data_loss(bare, t, KEY_A, "carries no MAC")


def test_without_a_cluster_key_nothing_is_maced_or_checked(sent):
    _, t = sent
    desc = seal(None, describe(3, VALUE, t, 16), t)
    assert desc.mac == b"" and torch.equal(checked_piece(desc, t, None).data, t)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_the_out_of_band_mac_setting_reaches_both_sides(setting):
    """`security.out_of_band_mac` (ZEROC_SECURITY_OUT_OF_BAND_MAC): "off" makes the prefill side's sinks send no
    MAC and the decode side's out-of-band transports check none, while the in-band stream keeps its key."""
    on = ZeroCConfig.from_env({"ZEROC_SECURITY_OUT_OF_BAND_MAC": setting}).security.out_of_band_mac == "on"
    service = KvTransportService(Capability(cuda=True, transports=(GRPC, CUDA_IPC)), torch.device("cpu"), None,
                                 threading.Event(), out_of_band_mac=on)
    sink = service.sink_for(prefill_pb2.PrefillRequest(transport=kind_to_proto(CUDA_IPC)), KEY_A)
    assert sink.mac_key == (KEY_A if on else None)
    decode = NegotiatingKvTransport("127.0.0.1:1", "fp", 1 << 20, 1 << 22, "auto", Capability(cuda=False),
                                    torch.device("cpu"), None, mac_key=KEY_A, out_of_band_mac=on)
    assert decode._oob_key == (KEY_A if on else None) and decode._mac_key == KEY_A
    decode.close()
    with pytest.raises(ValueError, match="out_of_band_mac"):
        ZeroCConfig.from_env({"ZEROC_SECURITY_OUT_OF_BAND_MAC": "maybe"})
