"""Transport security of every gRPC server and channel: TLS, mTLS between services, or plaintext on
loopback only (and logged as such).

With TLS configured (ZEROC_SECURITY_TLS_CA / _CERT / _KEY) a service listens twice on one server:
the public port (TLS; callers authenticate with bearer tokens) and the internal port (mTLS: the caller
must present a certificate of the deployment's CA). Internal RPCs (Prefill, KvStoreService) answer
only calls carrying such a verified certificate, so on the public port they are PERMISSION_DENIED.
Without TLS a service must listen on loopback, and internal RPCs answer loopback peers only.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from zeroc.config import SecurityConfig

log = logging.getLogger(__name__)

# Reconnect within about a second after a peer restarts (gRPC's default backoff grows to 120 s).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass(frozen=True)
class Tls:
    """PEM bytes: the deployment's CA, and this process's certificate chain and private key."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_config(cls, cfg: SecurityConfig) -> "Tls | None":
        paths = {"tls_ca": cfg.tls_ca, "tls_cert": cfg.tls_cert, "tls_key": cfg.tls_key}
        if not any(paths.values()):
            return None
        missing = [f"ZEROC_SECURITY_{name.upper()}" for name, p in paths.items() if not p]
        if missing:
            raise ValueError(f"TLS needs a CA, a certificate and a key; missing {', '.join(missing)}")
        return cls(*(Path(p).read_bytes() for p in paths.values()))


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_port(server: grpc.Server, address: str, tls: Tls | None, require_client_cert: bool,
             allow_plaintext: str = "loopback") -> int:
    """Listen on `address`: TLS (mTLS with `require_client_cert`), or plaintext on loopback only
    (anywhere with `allow_plaintext="any"`)."""
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                            require_client_auth=require_client_cert)
        return server.add_secure_port(address, creds)
    host = address.rsplit(":", 1)[0]
    if not is_loopback(host) and allow_plaintext != "any":
        raise ValueError(f"plaintext gRPC is only allowed on loopback, not {host}: set ZEROC_SECURITY_TLS_CA, "
                         "_CERT and _KEY (zeroc stack up --tls makes a throwaway set)")
    return server.add_insecure_port(address)  # ServiceHost logs it once serving


def open_channel(target: str, tls: Tls | None = None, options: list | None = None, ca: bytes | None = None
                 ) -> grpc.Channel:
    """A channel to `target`: mTLS with `tls` (this process's certificate), TLS with only a `ca`, else
    plaintext (loopback only). Reconnects within about a second of the peer coming back."""
    opts = [*RECONNECT_OPTIONS, *(options or [])]
    if tls is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                             certificate_chain=tls.cert)
        return grpc.secure_channel(target, creds, options=opts)
    if ca is not None:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), options=opts)
    return grpc.insecure_channel(target, options=opts)


def is_service_call(context: grpc.ServicerContext, allow_plaintext: str = "loopback") -> bool:
    """Whether the caller is a service of this deployment: a certificate our CA verified (mTLS), or, on a
    plaintext server, a loopback peer (any peer where the operator allowed plaintext off loopback: then the
    network is the boundary, as in the network-namespace benchmarks)."""
    security = context.auth_context().get("transport_security_type", [b""])[0]
    if security == b"ssl":
        return bool(context.peer_identities())
    return allow_plaintext == "any" or context.peer().startswith(("ipv4:127.", "ipv6:[::1]", "unix:"))


def require_service(context: grpc.ServicerContext, allow_plaintext: str = "loopback") -> None:
    if not is_service_call(context, allow_plaintext):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "an internal RPC: only services of this deployment "
                      "(a client certificate of its CA, on the internal port) may call it")
