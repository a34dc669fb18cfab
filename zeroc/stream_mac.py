"""MACs of the KV chunks on the Prefill stream: only a service holding the deployment's cluster key can
make KV a decode service accepts from its prefill service.

The prefill service that computed a chunk MACs it; the decode service checks the MAC on arrival, after
the CRC32C (which stays the cheap check against corruption), and before a byte lands in its cache. The
key is per request: HMAC of the stream key (derived from the cluster key) over the request's id, its
token ids and `cached_prefix_tokens`, so a chunk MACed for one prompt does not verify for another. Each
chunk's MAC covers its header fields (layer, tensor, first token, shape, dtype) and its payload.

Without a configured cluster key there is nothing two services share: the prefill service sends no MAC
and the decode service checks none (it logs that once, and only accepts that from a loopback peer;
see `zeroc.transport.decode_side.make_kv_transport`).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Sequence

from zeroc.config import SecurityConfig
from zeroc.security import cluster_key, derive

MAC_BYTES = 16


def stream_key(cfg: SecurityConfig) -> bytes | None:
    """The deployment's key for Prefill stream MACs; None without a configured cluster key."""
    if not (cfg.cluster_key or cfg.cluster_key_file):
        return None
    return derive(cluster_key(cfg), "zeroc-prefill-stream")


def request_key(key: bytes, request_id: str, token_ids: Sequence[int], cached_prefix_tokens: int) -> bytes:
    """The MAC key of one Prefill request's chunks (both sides compute it from the request they sent or got)."""
    h = hmac.new(key, request_id.encode() + b"\0", hashlib.sha256)
    h.update(struct.pack(f"<II{len(token_ids)}I", cached_prefix_tokens, len(token_ids), *token_ids))
    return h.digest()


def chunk_mac(key: bytes, layer: int, tensor: int, first_token: int, shape: Sequence[int], dtype: str,
              data: bytes | memoryview) -> bytes:
    """MAC of one KvChunk under a request's key: its header fields, then its payload."""
    head = struct.pack(f"<IIII{len(shape)}I", layer, tensor, first_token, len(shape), *shape) + dtype.encode()
    h = hmac.new(key, head + b"\0", hashlib.sha256)
    h.update(data)
    return h.digest()[:MAC_BYTES]


def check_chunk(key: bytes, layer: int, tensor: int, first_token: int, shape: Sequence[int], dtype: str,
                data: bytes | memoryview, mac: bytes) -> bool:
    """Whether `mac` is the chunk's MAC under the request's key (compared in constant time)."""
    return hmac.compare_digest(chunk_mac(key, layer, tensor, first_token, shape, dtype, data), mac)
