"""TLS termination: a server context from certificate and key files, reloaded when they change.

Renewals by certbot or cert-manager replace the files. A changed pair is loaded into a context of
its own, and each new handshake is switched to the newest context that loaded (the SNI callback
runs for every handshake, with or without a server name): no restart and no dropped connection.
A pair that fails to load (half-written, a certificate without its key yet, mismatched) is logged
and the old one keeps serving. It is never loaded into the context in use: OpenSSL installs a
new certificate before it finds that the key does not match, and would leave that context with
no usable pair.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Protocol

from gateway.files import describe_read_error, signature

log = logging.getLogger(__name__)

# Mozilla's "intermediate" TLS 1.2 suites; TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def bare_server_context() -> ssl.SSLContext:
    """The gateway's TLS settings, without a certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context serving this pair; ssl.SSLError or OSError when it cannot be loaded."""
    context = bare_server_context()
    context.load_cert_chain(cert, key)
    return context


class ChallengeContexts(Protocol):
    """Contexts answering a CA's TLS-ALPN-01 challenge for a name (gateway.acme.challenges)."""

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None: ...


class TlsContext:
    def __init__(
        self, cert: Path, key: Path, *, managed: bool = False, challenges: ChallengeContexts | None = None
    ) -> None:
        """`managed`: the pair comes later (an ACME order); until it does, handshakes fail."""
        self.cert, self.key = cert, key
        self.challenges = challenges
        if managed and not (cert.exists() and key.exists()):
            self.context = bare_server_context()
        else:
            self.context = server_context(cert, key)  # the listener's; at start-up a bad pair is fatal
        self.serving = self.context  # the newest pair that loaded
        self.context.sni_callback = self._newest
        self._signatures = (signature(cert), signature(key))

    def _newest(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        if self.challenges is not None:
            answering = self.challenges.context_for(server_name)
            if answering is not None:
                connection.context = answering
                return
        if self.serving is not context:
            connection.context = self.serving

    def reload_if_changed(self) -> bool:
        signatures = (signature(self.cert), signature(self.key))
        if signatures == self._signatures:
            return False
        self._signatures = signatures
        try:
            fresh = server_context(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate not reloaded, keeping the current one: %s", exc)
            return False
        self.serving = fresh
        log.info("TLS certificate reloaded from %s", self.cert)
        return True


def check_pair(cert: Path, key: Path) -> str | None:
    """Why this certificate and key cannot be served, in words, or None."""
    for path, marker, what in (
        (cert, b"-----BEGIN CERTIFICATE-----", "certificate"),
        (key, b"PRIVATE KEY-----", "private key"),
    ):
        try:
            data = path.read_bytes()
        except OSError as exc:
            return describe_read_error(path, exc)
        if marker not in data:
            return f"{path} holds no PEM {what}"
    try:
        TlsContext(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return f"the private key in {key} does not belong to the certificate in {cert}"
        return f"{cert}, {key}: cannot be loaded: {exc.reason or exc}"
    except OSError as exc:
        return f"{cert}, {key}: cannot be loaded: {exc.strerror or exc}"
    return None
