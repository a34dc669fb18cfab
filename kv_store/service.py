"""What a prefill or decode service needs to be a KV-store holder: `open_store` wires the parts.

Without a Redis URL the service starts an embedded redis-server of its own (so `zeroc serve`
alone still reuses its own prefixes); with one (``zeroc stack up`` passes the stack's), services
share the index and fetch blocks from each other. ``url = "off"`` or ``capacity_mb = 0``: no store.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

from grpc_health.v1 import health_pb2

from kv_store.embedded import EmbeddedRedis
from kv_store.hashing import store_seed
from kv_store.index import RedisBlockIndex
from kv_store.integrity import mac_key
from kv_store.peer import SERVICE_NAME, KvStoreServicer, PeerFetcher
from kv_store.pool import BlockPool
from kv_store.store import KvStore
from zeroc.config import RedisConfig, KvStoreConfig, ZeroCConfig
from zeroc.kv_cache import layer_shapes
from zeroc.loader import LoadedModel
from zeroc.metrics import StoreSnapshot
from zeroc.rpc import ServiceHost
from zeroc.security import TenantKeys, cluster_key
from zeroc.tls import Tls

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """The URL without its password, for logs and model info."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


@dataclass
class KvStoreHandle:
    """A running store and the embedded Redis it owns (if any); `close` stops both."""

    store: KvStore
    embedded: EmbeddedRedis | None

    def close(self) -> None:
        self.store.close()
        if self.embedded is not None:
            self.embedded.close()


def open_store(redis_cfg: RedisConfig, store_cfg: KvStoreConfig, loaded: LoadedModel, model_fingerprint: str,
               block_size: int, holder: str, chunk_bytes: int, max_message_bytes: int,
               on_state: Callable[[str], None] = lambda state: None, keys: TenantKeys | None = None,
               block_mac_key: bytes | None = None, tls: Tls | None = None) -> KvStoreHandle | None:
    """The store of a service holding blocks of `loaded`'s KV, or None when reuse is off."""
    if redis_cfg.url == "off" or store_cfg.capacity_mb == 0:
        log.info("kv store off")
        return None
    param = next(loaded.model.parameters())
    shapes = layer_shapes(loaded.config)
    capacity = BlockPool.blocks_for(shapes, block_size, param.dtype, store_cfg.capacity_mb)
    if capacity < 1:
        raise ValueError(f"store capacity_mb={store_cfg.capacity_mb} holds no block of this model; raise it")
    if not store_cfg.advertise and holder.rsplit(":", 1)[0] in ("0.0.0.0", "[::]", "::"):
        log.warning("listening on a wildcard address: set ZEROC_STORE_ADVERTISE=HOST:PORT so peers can fetch "
                    "blocks from this service", extra={"listen": holder})
    embedded = None if redis_cfg.url else EmbeddedRedis().start()
    url = redis_cfg.url or embedded.url
    try:
        dtype = str(param.dtype).removeprefix("torch.")
        seed = store_seed(model_fingerprint, loaded.config, dtype, block_size)
        pool = BlockPool(shapes, block_size, capacity, param.dtype, param.device)
        index = RedisBlockIndex(url, store_cfg.namespace, redis_cfg.timeout_s)
        # Chunks must fit this service's own receive limit, with room for the message's metadata.
        fetcher = PeerFetcher(seed, max(1024, min(chunk_bytes, max_message_bytes - (64 << 10))), max_message_bytes,
                              tls)
        store = KvStore(pool, index, store_cfg.advertise or holder, seed, store_cfg, redis_cfg.retry_s, fetcher,
                        redact(url), on_state, keys, block_mac_key)
    except BaseException:
        if embedded is not None:
            embedded.close()
        raise
    log.info("kv store on", extra={"index": redact(url), "embedded": embedded is not None,
                                   "capacity_blocks": capacity, "holder": store.holder})
    return KvStoreHandle(store, embedded)


def set_store_health(host: ServiceHost, state: str) -> None:
    """The KvStoreService health entry says whether the index is reachable (the service serves either way)."""
    ok = state == "ok" and not host.draining.is_set()
    host.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING if ok
                    else health_pb2.HealthCheckResponse.NOT_SERVING)


def attach_store(cfg: ZeroCConfig, loaded: LoadedModel, fingerprint: str, host: ServiceHost,
                 servicer: KvStoreServicer) -> KvStoreHandle | None:
    """Open the service's KV store (see kv_store.service) and let the FetchBlocks servicer serve its pool.

    None with a KV policy (`--kv-policy`): the pool holds plain cache blocks, and a policy's
    blocks (packed codes, evicted tokens) are not those, so such services do not reuse prefixes.
    None for a model with a token tier too: a prefix's blocks lack the full-rank rows of its last
    `recent` tokens, which the next token's attention needs (docs/compression.md, "Token tier")."""
    if cfg.cache.kv_policy != "none":
        log.info("kv store off: prefix reuse does not cover --kv-policy caches",
                 extra={"kv_policy": cfg.cache.kv_policy})
        return None
    if loaded.config.has_tier:
        log.info("kv store off: prefix reuse does not cover a model's token tier")
        return None
    secret = cluster_key(cfg.security)
    handle = open_store(cfg.redis, cfg.store, loaded, fingerprint, cfg.cache.block_size, host.internal_address,
                        cfg.transfer.chunk_bytes, cfg.server.max_message_mb << 20,
                        on_state=lambda state: set_store_health(host, state),
                        keys=TenantKeys.from_config(cfg.security, secret), block_mac_key=mac_key(secret),
                        tls=host.tls)
    if handle is not None:
        store = handle.store
        servicer.attach(store.pool, store.seed, store.served, store.pins_changed)
    return handle


def store_snapshot(store: KvStore | None) -> StoreSnapshot:
    """The store's counters for the service's metrics ("off" without a store)."""
    if store is None:
        return StoreSnapshot("off")
    s = store.stats()
    return StoreSnapshot(s.state, s.hit_tokens, s.lookups, s.peer_blocks, s.peer_bytes, s.blocks_held,
                         s.capacity_blocks, s.index_errors, s.evictions)
