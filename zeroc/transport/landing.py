"""A prompt's KV from a prefill service into a decode cache that stores it in a policy's form.

The wire carries full-precision K/V (`zeroc.kv_transfer`'s format is unchanged); a decode cache
with a KV policy lands them in a transient full-precision cache for that one prompt, then
encodes them into its own blocks (`PagedKVCache.load`): encode on arrival. The prefill service
must run the same policy, so that the K/V it computes are those the decode side would have
computed (KIVI's attention sees quantised blocks); the KV fingerprint includes the policy, so
services that disagree refuse each other (FAILED_PRECONDITION).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import grpc
from torch import Tensor

from zeroc.config import CacheConfig
from zeroc.kv_cache import PagedKVCache
from zeroc.kv_transfer import KvReceiver, KvTransferError, TierRows
from zeroc.policies import make_policy
from zeroc.tier import tier_positions
from zeroc.policies.tier import TokenTier


def kv_fingerprint(model_fingerprint: str, cache: CacheConfig) -> str:
    """The model's fingerprint, extended by the KV policy's label when there is one."""
    policy = make_policy(cache)
    if policy is None:
        return model_fingerprint
    return hashlib.sha256(f"{model_fingerprint}/{policy.label}".encode()).hexdigest()[:16]


def check_transfer(cache: CacheConfig) -> None:
    """ValueError if the policy's KV cannot travel between a prefill and a decode service."""
    policy = make_policy(cache)
    if policy is not None and not policy.transferable:
        raise ValueError(f"--kv-policy {cache.kv_policy} keeps tokens chosen by attention (scores, queries), "
                         "which a KV transfer does not carry: run it with `zeroc serve decode --colocated`")


def receive_into(cache: PagedKVCache, seq_id: str, slots: Tensor, start: int = 0
                 ) -> tuple[KvReceiver, Callable[[], None]]:
    """The receiver a transport fills with the KV of `seq_id`'s reserved `slots` ([T]) from prompt
    position `start` on, and the call that finishes the job once the transfer is complete (a no-op
    for the plain cache). Call it where nothing else touches the cache (the decode service: under
    its engine loop's lock). A policy cache takes whole prompts (start 0): it reuses no prefixes.
    A token tier's cache (zeroc/policies/tier.py) also takes the tier rows, and lands them with the rest."""
    if cache.pools is None:
        return KvReceiver(cache, slots, start), lambda: None
    if start:
        raise ValueError(f"a {type(cache.pools).__name__} cache receives whole prompts, not from token {start}")
    n = int(slots.shape[0])
    landing = PagedKVCache(cache.shapes, CacheConfig(block_size=cache.block_size,
                                                     num_blocks=-(-n // cache.block_size)),
                           cache.dtype, cache.device)
    landing_slots = landing.schedule([(seq_id, n)]).slot_mapping
    tier = _tier_rows(cache, n)

    def land() -> None:
        if cache.seq_len(seq_id) != n:  # released meanwhile (cancelled): its blocks may be someone else's
            raise KvTransferError(grpc.StatusCode.CANCELLED, "request released during KV transfer")
        for layer in range(cache.num_layers):
            k_pool, v_pool = landing.layer(layer)
            k = k_pool.view(-1, *k_pool.shape[2:])[landing_slots]  # [T, kv_heads, k_dim]
            v = v_pool.view(-1, *v_pool.shape[2:])[landing_slots]  # [T, kv_heads, v_dim]
            cache.load(seq_id, layer, k, v)
            if tier is not None:  # the sinks' and the window's full-rank rows, into the tier pools's ring
                cache.load_tier(seq_id, layer, tier.positions, tier.k[layer], tier.v[layer])

    return KvReceiver(landing, landing_slots, tier=tier), land


def _tier_rows(cache: PagedKVCache, tokens: int) -> TierRows | None:
    """Where a prompt's token-tier rows land, if the cache keeps a tier."""
    policy = cache.policy
    if not isinstance(policy, TokenTier):
        return None
    widths = [(s.kv_heads, t.tier_k, t.tier_v) for s, t in zip(cache.shapes, policy.layers)]
    return TierRows(widths, tokens, tier_positions(policy.sinks, policy.recent, tokens), cache.dtype)
