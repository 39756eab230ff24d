"""Signing and checking the gateway's tokens (JWTs, as distribution reads them).

Checking trusts nothing the token says about its own key: the algorithm must be the one of a key
the gateway holds (no `none`, no HMAC, whatever the header says), the key is chosen by `kid`
among the gateway's own (current and previous, for rotation), and `iss`, `aud`, `exp` and `nbf`
are required to hold with a small leeway. A verified token is remembered until it expires.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from gateway.tokens.keys import SigningKey
from gateway.tokens.scopes import Scope

LEEWAY = 60  # seconds of clock skew, as distribution allows
CACHE_SIZE = 10_000
MAX_TOKEN_LENGTH = 8192  # ours are well under 2 KiB


@dataclass(frozen=True)
class Claims:
    subject: str  # "" for an anonymous token
    access: tuple[Scope, ...]
    expires: float
    issued: float = 0.0
    secret: str | None = None  # a robot's token: which of its secrets it was issued for (robots.Robot)


@dataclass(frozen=True)
class RefreshClaims:
    subject: str
    fingerprint: str  # of the user's stored password hash when it was issued
    issued: float
    kid: str  # the key that signed it (its secret keys the fingerprint)


class InvalidToken(Exception):
    """Why a token is refused (never containing the token)."""


REFRESH_USE = "refresh"  # the `token_use` claim of refresh tokens; access tokens have none


def refresh_audience(service: str) -> str:
    """The `aud` of refresh tokens: the gateway's token endpoint for that service, never the
    service itself. A registry checking tokens (distribution's `auth: token`) compares `aud` with
    its service and ignores `token_use`: a refresh token with the service's audience would be an
    access token there, for days, out of reach of `token revoke`."""
    return f"refresh-token:{service}"


def _standard_claims(issuer: str, service: str, subject: str, now: int, lifetime: int) -> dict[str, object]:
    return {
        "iss": issuer,
        "sub": subject,
        "aud": service,
        "exp": now + lifetime,
        "iat": now,
        "jti": secrets.token_urlsafe(16),
    }


def _sign(key: SigningKey, claims: dict[str, object], x5c: Sequence[str] = ()) -> str:
    headers: dict[str, object] = {"kid": key.kid, "typ": "JWT"}
    if x5c:
        headers["x5c"] = list(x5c)
    return jwt.encode(claims, key.private, algorithm=key.algorithm, headers=headers)


def issue(
    key: SigningKey,
    issuer: str,
    service: str,
    subject: str,
    access: Sequence[Scope],
    lifetime: int,
    x5c: Sequence[str] = (),
    secret: str | None = None,
) -> tuple[str, int]:
    """A signed token and its issue time (epoch seconds). With `x5c` (base64 DER certificates,
    the key's first) the header carries the chain, which distribution 3.x needs. `secret`: a
    robot's secret's fingerprint (Robot.fingerprint), so that the token ends with that secret."""
    # Whole seconds: distribution 2.8 reads iat, nbf and exp as integers (revocations.py copes).
    now = int(time.time())
    claims = _standard_claims(issuer, service, subject, now, lifetime)
    claims.update(nbf=now - 1, access=[scope.claim() for scope in access])
    if secret is not None:
        claims["rgw_secret"] = secret
    return _sign(key, claims, x5c), now


def issue_refresh(
    key: SigningKey, issuer: str, service: str, subject: str, fingerprint: str, lifetime: int
) -> str:
    """A refresh token (docker's identity token): who, and the fingerprint of their password;
    for the gateway's token endpoint alone (its own audience)."""
    claims = _standard_claims(issuer, refresh_audience(service), subject, int(time.time()), lifetime)
    claims.update(token_use=REFRESH_USE, pwd=fingerprint)
    return _sign(key, claims)


class Verifier:
    def __init__(
        self,
        keys: Sequence[SigningKey],
        issuer: str,
        audience: str,
        longest_lifetime: int = 86400,
        retired_at: dict[str, float] | None = None,
    ) -> None:
        self.keys = {key.kid: key for key in keys}
        self.issuer = issuer
        self.audience = audience  # the service for access tokens, refresh_audience() for refresh tokens
        self.longest_lifetime = longest_lifetime  # no token of ours lives longer (a leaked key's would)
        self.retired_at = retired_at or {}  # kid -> when it stopped signing: nothing newer is ours
        self._cache: OrderedDict[bytes, Claims] = OrderedDict()

    def verify(self, token: str) -> Claims:
        self._screen(token)
        cache_key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(cache_key)
        if cached is not None:
            if cached.expires + LEEWAY > time.time():
                self._cache.move_to_end(cache_key)
                return cached
            del self._cache[cache_key]
        claims = self._check(token)
        self._cache[cache_key] = claims
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return claims

    @staticmethod
    def _screen(token: str) -> None:
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise InvalidToken("malformed token")

    def verify_refresh(self, token: str) -> RefreshClaims:
        self._screen(token)
        payload = self._decode(token)
        fingerprint = payload.get("pwd")
        if payload.get("token_use") != REFRESH_USE or not isinstance(fingerprint, str):
            raise InvalidToken("not a refresh token")
        issued = payload.get("iat", 0)
        return RefreshClaims(
            str(payload["sub"]),
            fingerprint,
            float(issued) if isinstance(issued, int | float) else 0.0,
            str(payload.get("_kid", "")),
        )

    def _check(self, token: str) -> Claims:
        payload = self._decode(token)
        if "token_use" in payload:
            raise InvalidToken("a refresh token is no access token")
        return self._claims(payload)

    def _decode(self, token: str) -> dict[str, object]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        key = self.keys.get(str(header.get("kid", "")))
        if key is None:
            raise InvalidToken("signed by a key this gateway does not hold")
        try:
            payload = jwt.decode(
                token,
                key.public,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidToken(f"token refused: {type(exc).__name__}") from None
        if not isinstance(payload.get("sub"), str):
            raise InvalidToken("malformed subject")
        issued, expires = payload.get("iat"), payload.get("exp")
        if not isinstance(issued, int | float) or not isinstance(expires, int | float):
            raise InvalidToken("malformed issue or expiry time")
        if expires - issued > self.longest_lifetime + LEEWAY:
            raise InvalidToken("token lives longer than this gateway's tokens do")
        retired = self.retired_at.get(str(header.get("kid", "")))
        if retired is not None and issued > retired + LEEWAY:
            raise InvalidToken("signed by a retired key after it was retired")
        return {**payload, "_kid": key.kid}

    def _claims(self, payload: dict[str, object]) -> Claims:
        access = payload.get("access", [])
        if not isinstance(access, list):
            raise InvalidToken("malformed access claim")
        scopes: list[Scope] = []
        for entry in access:
            if not isinstance(entry, dict):
                raise InvalidToken("malformed access claim")
            kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
            if not (isinstance(kind, str) and isinstance(name, str) and isinstance(actions, list)):
                raise InvalidToken("malformed access claim")
            scopes.append(Scope(kind, name, frozenset(str(a) for a in actions)))
        expires, issued = payload["exp"], payload.get("iat", 0)
        if not isinstance(expires, int | float) or not isinstance(issued, int | float):
            raise InvalidToken("malformed expiry")
        secret = payload.get("rgw_secret")
        return Claims(
            str(payload["sub"]),
            tuple(scopes),
            float(expires),
            float(issued),
            secret if isinstance(secret, str) else None,
        )


def claimed_subject(token: str) -> str:
    """The `sub` a token says it is for, NOT verified: only to know whose lockout to consult
    before the token is checked (an answer that depends on a secret never comes first). ""
    when there is none to read."""
    try:
        subject = jwt.decode(token[:MAX_TOKEN_LENGTH], options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        return ""
    return subject if isinstance(subject, str) else ""
