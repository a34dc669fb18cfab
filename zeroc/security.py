"""Secrets of a deployment: the cluster key, and what derives from it (tenant keys for block ids, the
MAC key for KV blocks). See docs/security.md for the threat model."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from pathlib import Path

from zeroc.config import SecurityConfig

log = logging.getLogger(__name__)
SHARED_TENANT = "\x00shared"  # the key every tenant uses when the operator opts into shared prefixes


def cluster_key(cfg: SecurityConfig) -> bytes:
    """The deployment's secret (32 bytes): from the file, else the setting, else random for this process."""
    raw = cfg.cluster_key
    if cfg.cluster_key_file:
        raw = Path(cfg.cluster_key_file).read_text().strip()
        if not raw:
            raise ValueError(f"security cluster_key_file {cfg.cluster_key_file} is empty")
    if not raw:
        log.warning("no cluster key (ZEROC_SECURITY_CLUSTER_KEY): a random one private to this process; its "
                    "prefix cache and KV blocks are shared with no other service")
        return secrets.token_bytes(32)
    return hashlib.sha256(b"zeroc-cluster-key:" + raw.encode()).digest()


def derive(key: bytes, purpose: str) -> bytes:
    """A sub-key of `key` for one purpose (HMAC-SHA256), so no two uses share a key."""
    return hmac.new(key, purpose.encode(), hashlib.sha256).digest()


class TenantKeys:
    """Per-tenant secrets for block ids: HMAC(cluster key, tenant). With `shared`, one key for all tenants."""

    def __init__(self, key: bytes, shared: bool = False, default_tenant: str = "default"):
        self._key, self.shared, self.default_tenant = key, shared, default_tenant
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: SecurityConfig, key: bytes) -> "TenantKeys":
        return cls(key, cfg.share_prefixes == "on", cfg.default_tenant)

    def key(self, tenant: str) -> bytes:
        name = SHARED_TENANT if self.shared else (tenant or self.default_tenant)
        with self._lock:
            if name not in self._keys:
                if len(self._keys) > 4096:  # bounded: tenants come from a token file, but be safe
                    self._keys.clear()
                self._keys[name] = derive(self._key, f"zeroc-tenant:{name}")
            return self._keys[name]
