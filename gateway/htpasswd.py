"""Apache htpasswd files: parsing, and checking a password against one stored hash.

Reads the formats Apache's `htpasswd` writes and nginx's `auth_basic` reads: bcrypt (`$2y$`,
`$2a$`, `$2b$`, the one we recommend), `$apr1$` (htpasswd's MD5 default), `{SHA}`, `{SSHA}`,
the `crypt(3)` schemes `$1$`, `$5$`, `$6$` and traditional DES (`htpasswd -d`, 13 characters, of
which only a password's first 8 count, as for nginx), and `{PLAIN}`. bcrypt goes through pyca/bcrypt; the
other crypt schemes through libpass (the maintained fork of passlib), never hand-written crypto.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import bcrypt
from passlib.hash import apr_md5_crypt, des_crypt, md5_crypt, sha256_crypt, sha512_crypt

log = logging.getLogger(__name__)

# bcrypt reads at most 72 bytes of a password; Apache's htpasswd and the registry silently ignore
# the rest, and pyca/bcrypt 5 raises on longer input, so we cut as they do.
BCRYPT_MAX_PASSWORD_BYTES = 72
MAX_LINE_LENGTH = 4096


@dataclass(frozen=True)
class StoredHash:
    scheme: str
    value: str = field(repr=False)

    @property
    def weak(self) -> bool:
        return self.scheme not in ("bcrypt", "sha512-crypt", "sha256-crypt")

    @property
    def bcrypt_cost(self) -> int | None:
        if self.scheme != "bcrypt":
            return None
        try:
            return int(self.value[4:6])
        except ValueError:
            return None

    def __repr__(self) -> str:
        return f"StoredHash(scheme={self.scheme!r}, value='***')"


@dataclass(frozen=True)
class HtpasswdFile:
    users: Mapping[str, StoredHash]
    warnings: tuple[str, ...] = ()


class HtpasswdError(ValueError):
    """The file cannot be used; the message names every bad line (never its hash)."""


def classify(stored: str) -> str | None:
    """The scheme of a stored hash, or None when we do not read it."""
    if stored.startswith(("$2y$", "$2a$", "$2b$")):
        return "bcrypt"
    if stored.startswith("$apr1$"):
        return "apr1"
    if stored.startswith("$1$"):
        return "md5-crypt"
    if stored.startswith("$5$"):
        return "sha256-crypt"
    if stored.startswith("$6$"):
        return "sha512-crypt"
    if stored.startswith("{SHA}"):
        return "sha1"
    if stored.startswith("{SSHA}"):
        return "salted-sha1"
    if stored.startswith("{PLAIN}"):
        return "plain"
    if _DES_CRYPT.fullmatch(stored):
        return "des-crypt"
    return None


# Two salt characters and eleven of hash, from crypt(3)'s alphabet; no prefix.
_DES_CRYPT = re.compile(r"[./0-9A-Za-z]{13}")


def well_formed(scheme: str, stored: str) -> bool:
    if scheme == "bcrypt":
        return len(stored) == 60 and stored[4:6].isdigit() and stored[6] == "$"
    if scheme == "sha1":
        try:
            return len(base64.b64decode(stored[5:], validate=True)) == 20
        except ValueError:
            return False
    if scheme == "salted-sha1":
        try:
            return len(base64.b64decode(stored[6:], validate=True)) > 20
        except ValueError:
            return False
    if scheme == "plain":
        return True
    try:
        parsed = _CRYPT_HANDLERS[scheme].from_string(stored)
    except ValueError:
        return False
    return parsed.checksum is not None


_CRYPT_HANDLERS = {
    "apr1": apr_md5_crypt,
    "md5-crypt": md5_crypt,
    "sha256-crypt": sha256_crypt,
    "sha512-crypt": sha512_crypt,
    "des-crypt": des_crypt,
}


def parse(text: str) -> HtpasswdFile:
    """Parse htpasswd content. Raises HtpasswdError naming every bad line at once."""
    users: dict[str, StoredHash] = {}
    problems: list[str] = []
    warnings: list[str] = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_LINE_LENGTH:
            problems.append(f"line {number}: longer than {MAX_LINE_LENGTH} characters")
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name:
            problems.append(f"line {number}: expected USER:HASH")
            continue
        scheme = classify(stored)
        if scheme is None:
            problems.append(f"line {number}: user {name!r} has a hash in an unsupported format")
            continue
        if not well_formed(scheme, stored):
            problems.append(f"line {number}: user {name!r} has a malformed {scheme} hash")
            continue
        if name in users:
            problems.append(f"line {number}: user {name!r} appears more than once")
            continue
        entry = StoredHash(scheme, stored)
        if entry.weak:
            warnings.append(f"user {name!r} has a weak {scheme} hash; re-create it with bcrypt (htpasswd -B)")
        users[name] = entry
    if problems:
        raise HtpasswdError("; ".join(problems))
    return HtpasswdFile(MappingProxyType(users), tuple(warnings))


def verify(password: str, stored: StoredHash) -> bool:
    """Check a password against one stored hash. CPU-bound for bcrypt: call off the event loop."""
    secret = password.encode("utf-8")
    scheme = stored.scheme
    if scheme == "bcrypt":
        try:
            return bcrypt.checkpw(secret[:BCRYPT_MAX_PASSWORD_BYTES], stored.value.encode("ascii"))
        except ValueError:
            return False
    if scheme == "sha1":
        digest = base64.b64encode(hashlib.sha1(secret).digest()).decode()  # noqa: S324 (format; flagged weak at load)
        return hmac.compare_digest(digest, stored.value[5:])
    if scheme == "salted-sha1":
        raw = base64.b64decode(stored.value[6:])
        expected, salt = raw[:20], raw[20:]
        actual = hashlib.sha1(secret + salt).digest()  # noqa: S324 (the format's; flagged weak at load)
        return hmac.compare_digest(actual, expected)
    if scheme == "plain":
        return hmac.compare_digest(secret, stored.value[7:].encode("utf-8"))
    handler = _CRYPT_HANDLERS.get(scheme)
    if handler is None:
        return False
    try:
        return bool(handler.verify(password, stored.value))
    except ValueError:
        return False


def make_dummy(cost: int) -> StoredHash:
    """A bcrypt hash of a random secret: unknown users are checked against it to cost the same."""
    secret = secrets.token_hex(16).encode()
    return StoredHash("bcrypt", bcrypt.hashpw(secret, bcrypt.gensalt(cost)).decode())
