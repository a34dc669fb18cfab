"""Block MACs: who may put KV into a service's cache.

A block's MAC is HMAC-SHA256 (cut to 16 bytes) under a key derived from the deployment's cluster key,
over the block id and its payload (every layer, K then V, as stored). The service that computes a
block makes its MAC; a service that fetches it from a peer checks the MAC over the bytes that landed
before using them. Whoever can write the index (Redis) but lacks the cluster key can point services
at a holder of its own, but cannot make KV they accept. The CRC32C stays as the cheap check against
corruption in transit.
"""

from __future__ import annotations

import hashlib
import hmac

import torch
from torch import Tensor

from zeroc.security import derive

MAC_BYTES = 16


def mac_key(cluster_key: bytes) -> bytes:
    return derive(cluster_key, "zeroc-block-mac")


def block_mac(key: bytes, block_id: str, k: list[Tensor], v: list[Tensor]) -> bytes:
    """MAC of one block: k[layer]: [block_size, kv_heads, k_dim]; v likewise."""
    h = hmac.new(key, block_id.encode(), hashlib.sha256)
    for kl, vl in zip(k, v):
        for t in (kl, vl):
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()[:MAC_BYTES]


def verified_prefix(key: bytes, block_ids: list[str], macs: list[bytes], k_pools: list[Tensor],
                    v_pools: list[Tensor], blocks: list[int]) -> int:
    """How many leading blocks, landed in cache blocks `blocks` (k_pools[layer]: [num_blocks, block_size,
    kv_heads, k_dim]), carry the MAC their sender claimed."""
    for i, (b, claimed, dest) in enumerate(zip(block_ids, macs, blocks)):
        want = block_mac(key, b, [p[dest] for p in k_pools], [p[dest] for p in v_pools])
        if not hmac.compare_digest(want, bytes(claimed)):
            return i
    return min(len(block_ids), len(macs), len(blocks))
