"""A throwaway PKI for local deployments and tests: a CA and certificates it signs (`zeroc stack up --tls`).

Certificates name 127.0.0.1, ::1 and localhost, and serve both as server and as client certificates
(services call each other with mTLS). Keys are ECDSA P-256; everything expires after `days`.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files written by `make_pki`."""

    ca: Path
    cert: Path
    key: Path

    def env(self) -> dict[str, str]:
        """The ZEROC_* settings a service needs to use these files."""
        return {"ZEROC_SECURITY_TLS_CA": str(self.ca), "ZEROC_SECURITY_TLS_CERT": str(self.cert),
                "ZEROC_SECURITY_TLS_KEY": str(self.key)}


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(out: Path, common_name: str = "zeroc-service", days: int = 7) -> Pki:
    """Write ca.pem, <common_name>.pem and <common_name>.key under `out` (the CA's key is not kept)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("zeroc throwaway CA")).issuer_name(_name("zeroc throwaway CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    pki = Pki(out / "ca.pem", out / f"{common_name}.pem", out / f"{common_name}.key")
    pki.ca.write_bytes(ca.public_bytes(Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(Encoding.PEM))
    pki.key.touch(mode=0o600)
    pki.key.write_bytes(_pem_key(key))
    return pki
