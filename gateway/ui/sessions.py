"""The page's session cookie and CSRF tokens. Pure: no I/O.

A session is the user, its identity source, when it was made and when it ends, and a fingerprint
of the user's stored password hash (for users of the files), signed with the gateway's session
key (HMAC-SHA256). Nothing is kept on the server: a `user passwd` changes the fingerprint, a
`user remove` the user, a `token revoke` the revocations, and each ends the session at its next
request (gateway.ui.pages checks them). The CSRF token of a form is an HMAC of the session
cookie itself: a page of another site can neither read it nor make it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

COOKIE = "rgw_session"
LIFETIME = 8 * 3600  # seconds: a working day, then log in again


@dataclass(frozen=True)
class Session:
    user: str
    source: str
    issued: float
    expires: float
    fingerprint: str  # of the stored password hash; "" for a directory's or a program's user


def fingerprint(key: bytes, stored_hash: str) -> str:
    return hmac.new(key, b"password\0" + stored_hash.encode(), hashlib.sha256).hexdigest()[:32]


def make(key: bytes, session: Session) -> str:
    body = json.dumps(
        {
            "u": session.user,
            "s": session.source,
            "i": session.issued,
            "e": session.expires,
            "f": session.fingerprint,
        },
        separators=(",", ":"),
    ).encode()
    payload = base64.urlsafe_b64encode(body).decode().rstrip("=")
    return f"{payload}.{_sign(key, payload)}"


def read(key: bytes, cookie: str | None, now: float) -> Session | None:
    """The session a cookie stands for, if we signed it and it has not ended."""
    if not cookie or len(cookie) > 4096 or cookie.count(".") != 1:
        return None
    payload, signature = cookie.split(".")
    if not hmac.compare_digest(_sign(key, payload), signature):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        session = Session(str(data["u"]), str(data["s"]), float(data["i"]), float(data["e"]), str(data["f"]))
    except (ValueError, KeyError, TypeError):
        return None
    return session if session.issued <= now < session.expires else None


def csrf_token(key: bytes, cookie: str) -> str:
    return _sign(key, "csrf\0" + cookie)


def csrf_ok(key: bytes, cookie: str | None, token: str | None) -> bool:
    return bool(cookie) and bool(token) and hmac.compare_digest(csrf_token(key, cookie or ""), token or "")


def _sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
