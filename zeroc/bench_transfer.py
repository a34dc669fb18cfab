"""`zeroc bench transfer`: KV bytes/s over the Prefill gRPC stream vs a raw TCP socket, on loopback.

Both senders run in a child process and send the same payload: one prompt's KV, layer by layer,
for the given shapes. The gRPC side uses the real wire format and receive path (`encode_layer`
chunks, CRC32C check and tensor view in `decode_chunk`); the raw side streams the same number of
bytes into a preallocated buffer, the ceiling any protocol on this host can reach.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import struct
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass

import grpc
import torch

from zeroc.kv_transfer import decode_chunk, encode_layer
from zeroc.v1 import prefill_pb2, prefill_pb2_grpc


@dataclass(frozen=True)
class TransferSpec:
    """One prompt's KV: `tokens` x `layers` x (K, V) x [kv_heads, head_dim] of `dtype`."""

    tokens: int = 512
    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    chunk_bytes: int = 2 << 20

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize

    @property
    def payload_bytes(self) -> int:
        return self.tokens * self.bytes_per_token


def _messages(spec: TransferSpec) -> list[prefill_pb2.PrefillResponse]:
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, spec.dtype)
    out = []
    for layer in range(spec.layers):
        k, v = (torch.randn(spec.tokens, spec.kv_heads, spec.head_dim, generator=gen).to(dtype) for _ in range(2))
        out += [prefill_pb2.PrefillResponse(chunk=c) for c in encode_layer(layer, k, v, 0, spec.chunk_bytes)]
    return out


class _Replay(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, messages):
        self.messages = messages

    def Prefill(self, request, context):
        yield from self.messages


def _exit_with_parent(parent: int) -> None:
    """Senders outlive nothing: a killed benchmark must not leave them listening."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _grpc_sender(spec: TransferSpec, ports, parent: int) -> None:
    _exit_with_parent(parent)
    limit = spec.chunk_bytes + (1 << 20)
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_send_message_length", limit)])
    prefill_pb2_grpc.add_PrefillServiceServicer_to_server(_Replay(_messages(spec)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ports.put(port)  # only once the server accepts calls
    server.wait_for_termination()


def _tcp_sender(spec: TransferSpec, ports, parent: int) -> None:
    _exit_with_parent(parent)
    payload = bytes(spec.chunk_bytes)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        ports.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            while header := conn.recv(8):
                (remaining,) = struct.unpack("!Q", header)
                while remaining:
                    n = min(remaining, len(payload))
                    conn.sendall(payload[:n])
                    remaining -= n


def _spawn(target, spec: TransferSpec):
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=target, args=(spec, ports, os.getpid()), daemon=True)
    proc.start()
    return proc, ports.get(timeout=120)


def _time_grpc(port: int, spec: TransferSpec, rounds: int) -> tuple[float, int]:
    limit = spec.chunk_bytes + (1 << 20)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", limit)]) as ch:
        stub = prefill_pb2_grpc.PrefillServiceStub(ch)
        received = 0
        list(stub.Prefill(prefill_pb2.PrefillRequest(token_ids=[1]), timeout=300))  # warm-up
        start = time.perf_counter()
        for _ in range(rounds):
            for msg in stub.Prefill(prefill_pb2.PrefillRequest(token_ids=[1]), timeout=300):
                piece = decode_chunk(msg.chunk)  # CRC32C check and tensor view, as the decode side does
                received += piece.data.numel() * piece.data.element_size()
        return time.perf_counter() - start, received


def _time_tcp(port: int, spec: TransferSpec, rounds: int) -> tuple[float, int]:
    buf = bytearray(spec.chunk_bytes)
    view = memoryview(buf)
    received = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        def one() -> int:
            sock.sendall(struct.pack("!Q", spec.payload_bytes))
            got = 0
            while got < spec.payload_bytes:
                got += sock.recv_into(view, min(len(buf), spec.payload_bytes - got))
            return got

        one()  # warm-up
        start = time.perf_counter()
        for _ in range(rounds):
            received += one()
        return time.perf_counter() - start, received


def run_transfer_bench(spec: TransferSpec, rounds: int = 3) -> dict:
    """Send `rounds` prompts' KV each way; returns rates in bytes/s and their ratio."""
    procs = []
    try:
        grpc_proc, grpc_port = _spawn(_grpc_sender, spec)
        procs.append(grpc_proc)
        tcp_proc, tcp_port = _spawn(_tcp_sender, spec)
        procs.append(tcp_proc)
        g_s, g_bytes = _time_grpc(grpc_port, spec, rounds)
        t_s, t_bytes = _time_tcp(tcp_port, spec, rounds)
    finally:
        for p in procs:
            p.terminate()
            p.join(10)
    assert g_bytes == t_bytes == rounds * spec.payload_bytes, (g_bytes, t_bytes)
    grpc_rate, tcp_rate = g_bytes / g_s, t_bytes / t_s
    return {"spec": asdict(spec), "rounds": rounds, "payload_bytes": spec.payload_bytes,
            "kv_bytes_per_prompt_token": {"uncompressed": spec.bytes_per_token},
            "grpc_bytes_per_s": grpc_rate, "raw_tcp_bytes_per_s": tcp_rate, "grpc_over_raw": grpc_rate / tcp_rate}
