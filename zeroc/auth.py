"""Bearer tokens on the public API: a token file maps tokens to tenant ids.

File format: one `TOKEN TENANT` pair per line; blank lines and `#` comments are skipped. A caller sends
``authorization: Bearer TOKEN`` in its gRPC metadata. Without a token file every caller is the default
tenant. Tokens are compared by their SHA-256, so a lookup takes the same time whatever prefix matches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from zeroc.config import ConfigError

MAX_TOKEN_CHARS = 4096


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuth:
    """Who a call is: its tenant (from its bearer token), or UNAUTHENTICATED."""

    def __init__(self, tokens: dict[str, str] | None, default_tenant: str):
        self.default_tenant = default_tenant
        self._tenants = None if tokens is None else {_digest(t): tenant for t, tenant in tokens.items()}

    @classmethod
    def from_file(cls, path: str, default_tenant: str) -> "TokenAuth":
        """The tokens of `path` (empty path: no authentication, everyone is `default_tenant`)."""
        if not path:
            return cls(None, default_tenant)
        tokens: dict[str, str] = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ConfigError(f"{path}:{n}: expected 'TOKEN TENANT'")
            tokens[parts[0]] = parts[1]
        if not tokens:
            raise ConfigError(f"{path}: no tokens")
        return cls(tokens, default_tenant)

    @property
    def required(self) -> bool:
        return self._tenants is not None

    def tenant(self, context: grpc.ServicerContext) -> str:
        """The caller's tenant; aborts UNAUTHENTICATED without a known bearer token (when tokens are required)."""
        if self._tenants is None:
            return self.default_tenant
        header = next((v for k, v in context.invocation_metadata() if k == "authorization"), None)
        if header is None or not isinstance(header, str) or not header.startswith("Bearer "):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "send 'authorization: Bearer TOKEN' metadata")
        tenant = self.tenant_of(header[len("Bearer "):].strip())
        if tenant is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        return tenant

    def tenant_of(self, token: str) -> str | None:
        """A token's tenant: the default one when tokens are not required, None for a token not in the file."""
        if self._tenants is None:
            return self.default_tenant
        return self._tenants.get(_digest(token)) if 0 < len(token) <= MAX_TOKEN_CHARS else None
