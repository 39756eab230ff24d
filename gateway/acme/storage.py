"""The ACME storage directory: the account key, the served pair (`cert.pem`, the full chain, and
`key.pem`), the answers to pending challenges, and a lock, so that gateways sharing the
directory (workers, replicas with a shared volume) never order at once. Keys are 0600 and every
file is written atomically."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.files import replace_atomically

TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")  # an ACME token: base64url, as RFC 8555 makes them


@dataclass(frozen=True)
class Stored:
    """The certificate being served: when it was issued and when it ends."""

    not_before: dt.datetime
    not_after: dt.datetime
    names: frozenset[str]
    serial: int = 0
    pem: bytes = field(default=b"", repr=False)  # the chain as stored: what ARI asks about

    def renew_at(self) -> dt.datetime:
        """When a third of its lifetime is left."""
        return self.not_after - (self.not_after - self.not_before) / 3


class Storage:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        self.account_key_path = directory / "account.key"
        self.http01 = directory / "http-01"
        self.tls_alpn01 = directory / "tls-alpn-01"

    def prepare(self) -> None:
        """Make the directory and its challenge folders (0700: keys live here)."""
        for folder in (self.directory, self.http01, self.tls_alpn01):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The ACME account's key, made (P-256) and kept on first use."""
        try:
            loaded = serialization.load_pem_private_key(self.account_key_path.read_bytes(), password=None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            replace_atomically(self.account_key_path, _pem(key), mode=0o600)
            return key
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.account_key_path}: not an EC private key")
        return loaded

    def stored(self) -> Stored | None:
        """The certificate in `cert.pem`, or None when there is none (or it cannot be read)."""
        try:
            pem = self.cert.read_bytes()
            certificate = x509.load_pem_x509_certificate(pem)
        except (OSError, ValueError):
            return None
        try:
            names = frozenset(
                certificate.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value.get_values_for_type(x509.DNSName)
            )
        except x509.ExtensionNotFound:
            names = frozenset()
        return Stored(
            certificate.not_valid_before_utc,
            certificate.not_valid_after_utc,
            names,
            certificate.serial_number,
            pem,
        )

    def save(self, fullchain: bytes, key: ec.EllipticCurvePrivateKey) -> None:
        """The new pair: the key first, then the chain (the TLS listener reloads when both changed
        and load together; see gateway.tls)."""
        replace_atomically(self.key, _pem(key), mode=0o600)
        replace_atomically(self.cert, fullchain, mode=0o644)

    def answer_http01(self, token: str, key_authorization: str) -> Path:
        if not TOKEN.match(token):
            raise ValueError("not an ACME token")
        path = self.http01 / token
        replace_atomically(path, key_authorization.encode(), mode=0o644)
        return path

    def http01_answer(self, token: str) -> bytes | None:
        """The key authorization for `token`, while its challenge is pending."""
        if not TOKEN.match(token):
            return None
        try:
            return (self.http01 / token).read_bytes()
        except OSError:
            return None

    def answer_tls_alpn01(self, name: str, certificate_and_key: bytes) -> Path:
        path = self.tls_alpn01 / _safe_name(name)
        replace_atomically(path, certificate_and_key, mode=0o600)
        return path

    def tls_alpn01_answer(self, name: str) -> Path | None:
        path = self.tls_alpn01 / _safe_name(name)
        return path if path.exists() else None

    @contextlib.contextmanager
    def ordering(self) -> Iterator[None]:
        """Held while ordering: one gateway at a time for this directory."""
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _safe_name(name: str) -> str:
    lowered = name.lower().rstrip(".")
    if not re.fullmatch(r"[a-z0-9.-]{1,253}", lowered) or ".." in lowered:
        raise ValueError(f"not a DNS name: {name!r}")
    return lowered


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
