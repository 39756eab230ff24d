"""Answering the CA's challenges from the storage directory, so that whichever worker (or gateway
sharing the directory) the CA's connection reaches knows the answer.

- HTTP-01: `GET /.well-known/acme-challenge/TOKEN` on the plain-HTTP (redirect) listener answers
  the key authorization (`http01_app_routes`).
- TLS-ALPN-01 (RFC 8737): a handshake naming a pending name gets a self-signed certificate for it
  carrying the key authorization's digest in the acmeIdentifier extension, and the protocol
  `acme-tls/1` (`AlpnChallenges`). Python's SNI callback cannot see which protocols the client
  offers, so while a name's challenge is pending (seconds) every handshake for that name gets the
  challenge certificate; docs/acme.md says so.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from gateway.acme.storage import Storage

ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ALPN_PROTOCOL = "acme-tls/1"
CHALLENGE_PATH = "/.well-known/acme-challenge/"


def tls_alpn01_certificate(name: str, key_authorization: str) -> bytes:
    """The self-signed certificate and key (PEM, one file) that answer TLS-ALPN-01 for `name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # The extension's value is a DER OCTET STRING of the SHA-256 digest (RFC 8737, 3).
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class AlpnChallenges:
    """For the TLS listener's SNI callback: the context answering a pending TLS-ALPN-01 challenge
    for a name, or None (the usual certificate)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._contexts: dict[Path, tuple[float, ssl.SSLContext]] = {}

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        if not server_name:
            return None
        try:
            path = self.storage.tls_alpn01_answer(server_name)
        except ValueError:
            return None
        if path is None:
            return None
        try:
            changed = path.stat().st_mtime
        except OSError:
            return None
        cached = self._contexts.get(path)
        if cached is not None and cached[0] == changed:
            return cached[1]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.set_alpn_protocols([ALPN_PROTOCOL])
        context.load_cert_chain(path)
        self._contexts = {path: (changed, context)}  # one pending name at a time is the usual
        return context


def http01_answer(storage: Storage) -> web.RouteDef:
    """The route answering HTTP-01 challenges, for the plain-HTTP listener (before its redirect)."""

    async def answer(request: web.Request) -> web.Response:
        found = storage.http01_answer(request.match_info["token"])
        if found is None:
            return web.Response(status=404, text="no such challenge\n")
        return web.Response(body=found, content_type="application/octet-stream")

    return web.get(CHALLENGE_PATH + "{token}", answer)


__all__ = ["AlpnChallenges", "http01_answer", "tls_alpn01_certificate"]
