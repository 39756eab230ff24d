"""The one place the tests make X.509 certificates: self-signed, or signed by a CA of their own,
for a service on loopback (Pebble's HTTPS, the LDAP server) or a token key's certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID


def certificate(
    subject: str,
    key: CertificateIssuerPrivateKeyTypes,
    *,
    signer: tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes] | None = None,
    names: Sequence[str] = (),
    addresses: Sequence[str] = (),
    ca: bool = False,
    days: int = 1,
) -> x509.Certificate:
    """A certificate for `key`'s public half, named `subject`, for the DNS `names` and IP
    `addresses` given; self-signed unless `signer` (a CA's certificate and key) signs it."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer[0].subject if signer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    alternatives: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alternatives += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    if alternatives:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(signer[1] if signer else key, hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(
    key: CertificateIssuerPrivateKeyTypes,
    form: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
