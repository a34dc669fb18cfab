"""`zeroc bench transfer`: KV bytes/s over the Prefill gRPC stream vs a raw TCP socket, on loopback.

One child process serves all the senders; this process receives. Each repeat moves `rounds`
prompts' KV (layer by layer, for the given shapes) four ways, back to back:

- gRPC: the shipping path end to end — `encode_layer_wire` chunks from tensors on the sender, the
  decode side's `GrpcKvTransport.fetch` (its channel options, CRC32C check, tensor view) writing
  into a real paged cache through `KvReceiver`;
- gRPC + MAC: the same, with the chunk MACs of a deployment with a cluster key (zeroc.stream_mac: made
  by the sender, checked by the receiver);
- bare gRPC: the same number of bytes as opaque messages of the same size over a channel like the
  transport's, no protobuf, no checks, no cache: the ceiling of gRPC in Python on this host;
- raw TCP: the same bytes through a plain socket into a preallocated buffer, the host's ceiling.

Ratios are taken within each repeat (the paths run seconds apart, so they see the same load) and
their median is reported; CPU seconds per GiB (both processes) are reported too, since on a shared
host they say more about cost than wall time does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import struct
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass
from typing import Callable

import grpc
import torch
from tqdm import tqdm

from zeroc.config import CacheConfig
from zeroc.kv_cache import LayerShape, PagedKVCache
from zeroc.kv_transfer import GrpcKvTransport, KvReceiver, add_prefill_service, encode_layer_wire
from zeroc.stream_mac import request_key
from zeroc.v1 import prefill_pb2, prefill_pb2_grpc

_BARE_SERVICE, _BARE_METHOD = "zeroc.bench.v1.Bytes", "Stream"  # bench-only, not part of the API
_GIB = float(1 << 30)
_MAC_REQUEST = "bench-mac"  # the request id that asks the sender for MACed chunks


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

    @property
    def wire_chunk_bytes(self) -> int:
        """Payload of one full chunk: whole token rows, at most `chunk_bytes`, at most one layer's K."""
        row = self.bytes_per_token // (self.layers * 2)
        return row * min(self.tokens, max(1, self.chunk_bytes // row))

    @property
    def message_limit(self) -> int:
        return self.wire_chunk_bytes + (1 << 20)


class _Replay(prefill_pb2_grpc.PrefillServiceServicer):
    """A prefill service whose model is fixed tensors: each call encodes and streams all layers."""

    def __init__(self, spec: TransferSpec, mac_key: bytes):
        self.mac_key = mac_key
        gen = torch.Generator().manual_seed(0)
        dtype = getattr(torch, spec.dtype)
        shape = (spec.tokens, spec.kv_heads, spec.head_dim)
        # per layer (k, v): [tokens, kv_heads, head_dim]
        self.layers = [tuple(torch.randn(shape, generator=gen).to(dtype) for _ in range(2)) for _ in range(spec.layers)]
        self.spec = spec

    def Prefill(self, request, context):
        key = None  # as a prefill service keys each request (prefill_service/server.py)
        if request.request_id == _MAC_REQUEST:
            key = request_key(self.mac_key, request.request_id, request.token_ids, request.cached_prefix_tokens)
        for layer, (k, v) in enumerate(self.layers):
            yield from encode_layer_wire(layer, k, v, 0, request.max_chunk_bytes, mac_key=key)
        yield prefill_pb2.PrefillResponse(summary=prefill_pb2.PrefillSummary(
            num_tokens=self.spec.tokens, num_layers=self.spec.layers, kv_bytes=self.spec.payload_bytes))


def _bare_handler(spec: TransferSpec) -> grpc.GenericRpcHandler:
    payload = os.urandom(spec.wire_chunk_bytes)  # messages as large as the real path's chunks

    def stream(request: bytes, context):
        remaining = int.from_bytes(request, "little")
        while remaining:
            n = min(remaining, len(payload))
            yield payload if n == len(payload) else payload[:n]
            remaining -= n

    identity = lambda b: b  # noqa: E731
    return grpc.method_handlers_generic_handler(_BARE_SERVICE, {
        _BARE_METHOD: grpc.unary_stream_rpc_method_handler(stream, identity, identity)})


def _serve_tcp(srv: socket.socket, chunk_bytes: int) -> None:
    payload = bytes(chunk_bytes)
    while True:
        conn, _ = srv.accept()
        with conn:
            while header := conn.recv(8):
                (remaining,) = struct.unpack("!Q", header)
                while remaining:
                    n = min(remaining, len(payload))
                    conn.sendall(payload[:n])
                    remaining -= n


def _exit_with_parent(parent: int) -> None:
    """Senders outlive nothing: a killed benchmark must not leave them listening."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _senders(spec: TransferSpec, ports, parent: int, mac_key: bytes) -> None:
    _exit_with_parent(parent)
    torch.set_num_threads(1)  # as a prefill service under `zeroc stack` (OMP_NUM_THREADS=1)
    server = grpc.server(futures.ThreadPoolExecutor(4),
                         options=[("grpc.max_send_message_length", spec.message_limit)])
    add_prefill_service(_Replay(spec, mac_key), server)
    server.add_generic_rpc_handlers((_bare_handler(spec),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        ports.put((grpc_port, srv.getsockname()[1]))  # only once both accept connections
        _serve_tcp(srv, spec.wire_chunk_bytes)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Receivers:
    """This process's side of the three paths; each returns the bytes of one prompt's KV."""

    def __init__(self, spec: TransferSpec, mac_key: bytes, grpc_port: int, tcp_port: int):
        self.spec = spec
        target = f"127.0.0.1:{grpc_port}"
        self.transport = GrpcKvTransport(target, "", spec.chunk_bytes, spec.message_limit)
        self.mac_transport = GrpcKvTransport(target, "", spec.chunk_bytes, spec.message_limit, mac_key=mac_key)
        shape = LayerShape(spec.kv_heads, spec.head_dim, spec.head_dim)
        self.cache = PagedKVCache([shape] * spec.layers, CacheConfig(block_size=16, num_blocks=-(-spec.tokens // 16)),
                                  getattr(torch, spec.dtype))
        self.slots = self.cache.schedule([("bench", spec.tokens)]).slot_mapping
        self.bare_channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", spec.message_limit)])
        self.bare = self.bare_channel.unary_stream(f"/{_BARE_SERVICE}/{_BARE_METHOD}")
        self.sock = socket.create_connection(("127.0.0.1", tcp_port))
        self.buf = memoryview(bytearray(spec.wire_chunk_bytes))

    def grpc(self) -> int:
        receiver = KvReceiver(self.cache, self.slots)
        return self.transport.fetch("bench", [0] * self.spec.tokens, receiver, 300, lambda: True)

    def grpc_mac(self) -> int:
        receiver = KvReceiver(self.cache, self.slots)
        return self.mac_transport.fetch(_MAC_REQUEST, [0] * self.spec.tokens, receiver, 300, lambda: True)

    def bare_grpc(self) -> int:
        return sum(len(m) for m in self.bare(self.spec.payload_bytes.to_bytes(8, "little"), timeout=300))

    def raw_tcp(self) -> int:
        self.sock.sendall(struct.pack("!Q", self.spec.payload_bytes))
        got = 0
        while got < self.spec.payload_bytes:
            got += self.sock.recv_into(self.buf, min(len(self.buf), self.spec.payload_bytes - got))
        return got

    def close(self) -> None:
        self.transport.close()
        self.mac_transport.close()
        self.bare_channel.close()
        self.sock.close()


def _timed(one: Callable[[], int], rounds: int, sender_pid: int) -> dict:
    """Rate and CPU cost (this process plus the sender) of `rounds` transfers."""
    cpu0, sender0, start = time.process_time(), _cpu_seconds(sender_pid), time.perf_counter()
    moved = sum(one() for _ in range(rounds))
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0 + _cpu_seconds(sender_pid) - sender0
    return {"bytes": moved, "seconds": seconds, "bytes_per_s": moved / seconds, "cpu_s_per_gib": cpu / (moved / _GIB)}


PATHS = ("grpc", "grpc_mac", "bare_grpc", "raw_tcp")


def run_transfer_bench(spec: TransferSpec, rounds: int = 3, repeats: int = 5, progress: bool = True) -> dict:
    """`repeats` x (`rounds` prompts' KV each way); rates in bytes/s, ratios to raw TCP per repeat."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    mac_key = os.urandom(32)  # a stream key, as zeroc.stream_mac derives one from the cluster key
    sender = ctx.Process(target=_senders, args=(spec, ports, os.getpid(), mac_key), daemon=True)
    sender.start()
    samples: list[dict] = []
    receivers = None
    threads = torch.get_num_threads()
    # Receive like a decode service under `zeroc stack` (OMP_NUM_THREADS=1): on a busy host, copies
    # into the cache split over OpenMP threads wait on each other far longer than they copy.
    torch.set_num_threads(1)
    try:
        receivers = _Receivers(spec, mac_key, *ports.get(timeout=120))
        for name in PATHS:
            getattr(receivers, name)()  # warm-up: connections, allocator, caches
        load_before = os.getloadavg()[0]
        for r in tqdm(range(repeats), desc="transfer repeats", disable=not progress):
            order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]  # no path always runs first
            samples.append({name: _timed(getattr(receivers, name), rounds, sender.pid) for name in order})
        load_after = os.getloadavg()[0]
    finally:
        torch.set_num_threads(threads)
        if receivers is not None:
            receivers.close()
        sender.terminate()
        sender.join(10)
    for s in samples:
        if {s[name]["bytes"] for name in PATHS} != {rounds * spec.payload_bytes}:
            raise RuntimeError(f"a path moved the wrong number of bytes: {s}")
    pooled = {name: sum(s[name]["bytes"] for s in samples) / sum(s[name]["seconds"] for s in samples)
              for name in PATHS}
    median = lambda f: statistics.median(f(s) for s in samples)  # noqa: E731
    return {"spec": asdict(spec), "rounds": rounds, "repeats": repeats, "payload_bytes": spec.payload_bytes,
            "kv_bytes_per_prompt_token": {"uncompressed": spec.bytes_per_token},
            # pooled over all repeats
            "grpc_bytes_per_s": pooled["grpc"], "bare_grpc_bytes_per_s": pooled["bare_grpc"],
            "raw_tcp_bytes_per_s": pooled["raw_tcp"], "grpc_over_raw": pooled["grpc"] / pooled["raw_tcp"],
            "grpc_mac_bytes_per_s": pooled["grpc_mac"],
            # what the chunk MACs cost: the MACed path's rate over the plain one's, per repeat (wall), and the
            # plain path's CPU per byte over the MACed one's (the rate ratio where CPU is the limit)
            "median_grpc_mac_over_grpc": median(lambda s: s["grpc_mac"]["bytes_per_s"] / s["grpc"]["bytes_per_s"]),
            "median_cpu_ratio_mac": median(lambda s: s["grpc"]["cpu_s_per_gib"] / s["grpc_mac"]["cpu_s_per_gib"]),
            # medians of the per-repeat wall-clock ratios
            "median_grpc_over_raw": median(lambda s: s["grpc"]["bytes_per_s"] / s["raw_tcp"]["bytes_per_s"]),
            "median_bare_grpc_over_raw": median(lambda s: s["bare_grpc"]["bytes_per_s"] / s["raw_tcp"]["bytes_per_s"]),
            "median_grpc_over_bare_grpc": median(lambda s: s["grpc"]["bytes_per_s"] / s["bare_grpc"]["bytes_per_s"]),
            "median_cpu_s_per_gib": {name: median(lambda s, n=name: s[n]["cpu_s_per_gib"]) for name in PATHS},
            # raw TCP's CPU per byte over the path's: the throughput ratio where CPU is the limit, and
            # the figure to quote on a shared host, where wall-clock ratios measure scheduler share
            "median_cpu_ratio_vs_raw": {name: median(lambda s, n=name: s["raw_tcp"]["cpu_s_per_gib"] / s[n]["cpu_s_per_gib"])
                                        for name in PATHS[:3]},
            "load_average_1m": [load_before, load_after], "cpus": os.cpu_count(), "samples": samples}
