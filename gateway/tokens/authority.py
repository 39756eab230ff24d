"""The gateway as a token issuer: its signing key (from `token_key`, reloaded when the file
changes, or ephemeral), the keys it still accepts, and the verifier over them.

Rotation: the key file holds the key that signs, then previous keys still accepted for as long as
they stay in it (refresh tokens live for days: `token keygen --rotate` keeps the last signer, and
that is the grace a planned rotation has). When the file changes, new tokens are signed with its
first key, and a key that left the file is refused at once, for every token: the file is the
whole list of keys the gateway trusts. Replacing a key by hand is what an operator does after a
leak, and whoever holds the leaked key can sign tokens that look older than the replacement; a
grace for "its own" tokens would be a grace for those too.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Mapping

from gateway import config
from gateway.config import Settings
from gateway.files import signature
from gateway.htpasswd import StoredHash
from gateway.tokens import keys, revocations
from gateway.tokens.jwt_tokens import (
    Claims,
    InvalidToken,
    Verifier,
    issue,
    issue_refresh,
    refresh_audience,
)
from gateway.tokens.scopes import Scope

log = logging.getLogger(__name__)

MINTED_CACHE_SIZE = 10_000
LOGGED_SERVICES = 32  # distinct wrong services logged per process: a client cannot flood the log
SHOWN_SERVICE = 100  # characters of a client's `service` shown back and logged


class TokenAuthority:
    def __init__(self, settings: Settings) -> None:
        self.issuer = settings.token_issuer
        self.service = settings.token_service
        self.lifetime = settings.token_lifetime
        self.realm = settings.token_realm
        self.refresh_lifetime = settings.refresh_token_lifetime  # 0: no refresh tokens
        self.path = settings.token_key
        if self.path is None:
            self.key = keys.generate()
            log.warning(
                "token_key not set: signing tokens with an ephemeral key; they end with this process "
                "(set token_key, made by `registry-gateway token keygen`, to keep them across restarts)"
            )
            self._previous: list[keys.SigningKey] = []
        else:
            self.key, *self._previous = keys.load_all(self.path)
        self.cert_path = settings.token_cert
        self.x5c = keys.certificate_chain(self.cert_path, self.key) if self.cert_path else []
        # Both files: a certificate that comes after its key is taken when it comes.
        self._signature = (signature(self.path), signature(self.cert_path))
        self.revocations_path = settings.token_revocations
        self._file_revoked = revocations.read(self.revocations_path)
        self._shared_revoked: dict[str, float] = {}  # from Redis (gateway.shared.revocations)
        self.revoked = self._file_revoked
        self._revocations_signature = signature(self.revocations_path)
        self._retired_at: dict[str, float] = {}  # kid of a previous key -> when it stopped signing
        self.verifier, self.refresh_verifier = self._verifiers()
        self._minted: dict[tuple[str, str], tuple[str, float]] = {}
        self._services_logged: set[str] = set()

    def wrong_service(self, asked: str) -> str:
        """What to tell, and log, when a token is asked for another service than token_service:
        which setting to change. A registry names its service in its challenge and clients ask
        for that one, so a mismatch is a configuration mistake, never the client's."""
        shown = asked[:SHOWN_SERVICE]
        message = (
            f"this gateway issues tokens for service {self.service!r}, not {shown!r}: set "
            f"token_service (gateway.yml, or {config.env_name('token_service')}) to the registry's "
            "auth.token.service (REGISTRY_AUTH_TOKEN_SERVICE)"
        )
        if shown not in self._services_logged and len(self._services_logged) < LOGGED_SERVICES:
            self._services_logged.add(shown)
            log.warning("token request refused: %s", message)
        return message

    def key_ids(self) -> list[str]:
        """The signing key's id, then those of the older keys still accepted (no secrets)."""
        return [self.key.kid, *(key.kid for key in self._previous)]

    def issue(self, subject: str, access: list[Scope], secret: str | None = None) -> tuple[str, int]:
        return issue(self.key, self.issuer, self.service, subject, access, self.lifetime, self.x5c, secret)

    def _verifiers(self) -> tuple[Verifier, Verifier]:
        """The verifier of access tokens, and that of refresh tokens (their own audience): both
        over the keys in the file and no other."""
        in_file = [self.key, *self._previous]
        longest = max(self.lifetime, self.refresh_lifetime)
        retired_at = dict(self._retired_at)
        return (
            Verifier(in_file, self.issuer, self.service, longest, retired_at),
            Verifier(in_file, self.issuer, refresh_audience(self.service), longest, retired_at),
        )

    def token_for(self, subject: str, access: list[Scope]) -> str:
        """A token for a request the gateway already authorized (for a registry that checks tokens
        itself), reused while it has more than half its life left."""
        cache_key = (subject, " ".join(sorted(str(scope) for scope in access)))
        now = time.time()
        cached = self._minted.get(cache_key)
        if cached is not None and cached[1] - now > self.lifetime / 2:
            return cached[0]
        token, issued = self.issue(subject, access)
        if len(self._minted) >= MINTED_CACHE_SIZE:
            self._minted.clear()
        self._minted[cache_key] = (token, issued + self.lifetime)
        return token

    def verify(self, token: str) -> Claims:
        claims = self.verifier.verify(token)
        if claims.subject and revocations.is_revoked(self.revoked, claims.subject, claims.issued):
            raise InvalidToken("revoked")
        return claims

    def issue_refresh(self, subject: str, stored: StoredHash) -> str:
        return issue_refresh(
            self.key,
            self.issuer,
            self.service,
            subject,
            password_fingerprint(self.key, stored),
            self.refresh_lifetime,
        )

    def refresh_subject(self, token: str, users: Mapping[str, StoredHash]) -> str:
        """The user a refresh token stands for, while it is valid: signed by a key in the key file,
        not expired, the user still there with the same password.
        Raises InvalidToken."""
        claims = self.refresh_verifier.verify_refresh(token)
        if revocations.is_revoked(self.revoked, claims.subject, claims.issued):
            raise InvalidToken("revoked: log in again")
        stored = users.get(claims.subject)
        if stored is None:
            raise InvalidToken("the user is gone")
        key = self.refresh_verifier.keys.get(claims.kid)
        if key is None or not hmac.compare_digest(password_fingerprint(key, stored), claims.fingerprint):
            raise InvalidToken("the password changed since this token was issued: log in again")
        return claims.subject

    def set_shared_revocations(self, shared: Mapping[str, float]) -> None:
        """The revocations every replica shares (Redis), beside the file's: a new mapping, so that
        whatever remembered a token's check against the old one checks it again."""
        self._shared_revoked = dict(shared)
        self.revoked = revocations.merged(self._file_revoked, self._shared_revoked)

    def reload_if_changed(self) -> bool:
        if self.revocations_path is not None:
            current = signature(self.revocations_path)
            if current != self._revocations_signature:
                self._revocations_signature = current
                try:
                    self._file_revoked = revocations.read(self.revocations_path)
                    self.revoked = revocations.merged(self._file_revoked, self._shared_revoked)
                    log.info("token revocations reloaded from %s", self.revocations_path)
                except revocations.RevocationsError as exc:
                    log.error("token revocations not reloaded, keeping the last good ones: %s", exc)
        if self.path is None:
            return False
        files_now = (signature(self.path), signature(self.cert_path))
        if files_now == self._signature:
            return False
        self._signature = files_now
        try:
            new, *previous = keys.load_all(self.path)
            x5c = keys.certificate_chain(self.cert_path, new) if self.cert_path else []
        except keys.KeyError_ as exc:
            log.error("token key not reloaded, keeping the current one: %s", exc)
            return False
        if x5c != self.x5c:
            self.x5c = x5c
            self._minted.clear()  # tokens minted for the registry carry the chain
            if new.kid == self.key.kid:
                log.info("token certificate reloaded from %s", self.cert_path)
        if new.kid == self.key.kid and [key.kid for key in previous] == [key.kid for key in self._previous]:
            return False
        if new.kid != self.key.kid:
            self._retired_at[self.key.kid] = time.time()  # nothing it signs from now on is ours
            self._retired_at.pop(new.kid, None)  # a key signing again (a rotation undone)
            self.key = new
            self._minted.clear()
        # Only the keys in the file are accepted from now on: a key taken out of it, the signer
        # of a moment ago included, is refused for every token it signed (the verifiers are new,
        # so are their caches of verified tokens).
        in_file = {key.kid for key in (new, *previous)}
        self._retired_at = {kid: when for kid, when in self._retired_at.items() if kid in in_file}
        self._previous = previous
        self.verifier, self.refresh_verifier = self._verifiers()
        log.info(
            "token key reloaded from %s (kid %s signs; %d previous key(s) accepted)",
            self.path,
            new.kid,
            len(previous),
        )
        return True


def password_fingerprint(key: keys.SigningKey, stored: StoredHash) -> str:
    """Changes whenever the user's password does, and tells nothing of it: keyed by a secret
    derived from the signing key, so that even a weak stored hash cannot be guessed from it."""
    secret = hashlib.sha256(b"registry-gateway refresh fingerprint\0" + keys.private_der(key)).digest()
    return hmac.new(secret, stored.value.encode(), hashlib.sha256).hexdigest()[:32]
