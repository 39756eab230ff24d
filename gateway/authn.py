"""Who is asking: Basic credentials checked against the htpasswd file, with a verified-credential cache.

docker sends credentials on every request, so a push of many layers would otherwise pay one bcrypt
verification per request. Successful verifications are remembered under a keyed hash of
user and password (a per-process random key; the password itself is never stored), for a bounded
time and count, and forgotten whenever the user file changes. bcrypt runs in a thread pool
(pyca/bcrypt releases the GIL) so a slow hash never stalls streaming, and concurrent requests
with the same credentials share one verification.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gateway import htpasswd

log = logging.getLogger(__name__)

MAX_AUTHORIZATION_LENGTH = 4096
DEFAULT_DUMMY_COST = 10


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***')"


class Malformed:
    """An Authorization header we cannot read; answered like wrong credentials."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def parse_basic_authorization(header: str | None) -> Credentials | Malformed | None:
    """Read a Basic Authorization header. None means no credentials were sent."""
    if header is None:
        return None
    if len(header) > MAX_AUTHORIZATION_LENGTH:
        return Malformed("authorization header too long")
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return Malformed("only Basic authorization is supported")
    try:
        decoded = binascii.a2b_base64(encoded.strip(), strict_mode=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return Malformed("credentials are not valid base64 of UTF-8 text")
    username, sep, password = decoded.partition(":")
    if not sep or not username:
        return Malformed("credentials must be USER:PASSWORD")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in decoded):
        return Malformed("credentials contain control characters")
    return Credentials(username, password)


@dataclass(frozen=True)
class UserSnapshot:
    """One consistent view of the user file, swapped whole on reload."""

    users: htpasswd.HtpasswdFile
    generation: int
    dummy: htpasswd.StoredHash = field(repr=False)


def _typical_bcrypt_cost(users: htpasswd.HtpasswdFile) -> int:
    costs = Counter(c for h in users.users.values() if (c := h.bcrypt_cost) is not None)
    return costs.most_common(1)[0][0] if costs else DEFAULT_DUMMY_COST


def _file_signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class UserFile:
    """The htpasswd file, re-read when it changes; a file that fails to load keeps the last good users."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature = _file_signature(path)
        self._generation = 0
        self.snapshot = self._load()  # raises at start-up: refuse to run without users

    def _load(self) -> UserSnapshot:
        text = self.path.read_text(encoding="utf-8")
        parsed = htpasswd.parse(text)
        for warning in parsed.warnings:
            log.warning("%s: %s", self.path, warning)
        self._generation += 1
        dummy = htpasswd.make_dummy(_typical_bcrypt_cost(parsed))
        return UserSnapshot(parsed, self._generation, dummy)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed on disk. Returns True when new users were swapped in."""
        signature = _file_signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            snapshot = self._load()
        except (OSError, UnicodeDecodeError, htpasswd.HtpasswdError) as exc:
            log.error("htpasswd %s not reloaded, keeping the last good users: %s", self.path, exc)
            return False
        self.snapshot = snapshot
        log.info("htpasswd %s reloaded: %d users", self.path, len(snapshot.users.users))
        return True


class CredentialCache:
    """Bounded LRU of verified credentials, keyed by HMAC(process key, user NUL password)."""

    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[str, int, float]] = OrderedDict()
        self.max_entries = max_entries
        self.ttl = ttl_seconds
        self.hits = 0
        self.misses = 0

    def key(self, credentials: Credentials) -> bytes:
        message = credentials.username.encode() + b"\0" + credentials.password.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def get(self, key: bytes, generation: int) -> str | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] != generation or entry[2] < time.monotonic():
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: bytes, username: str, generation: int) -> None:
        if self.max_entries <= 0 or self.ttl <= 0:
            return
        self._entries[key] = (username, generation, time.monotonic() + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Authenticator:
    def __init__(
        self,
        user_file: UserFile,
        cache: CredentialCache,
        workers: int | None = None,
    ) -> None:
        self.user_file = user_file
        self.cache = cache
        self._executor = ThreadPoolExecutor(
            max_workers=workers or min(4, (os.cpu_count() or 1) * 2),
            thread_name_prefix="bcrypt",
        )
        self._in_flight: dict[bytes, asyncio.Future[str | None]] = {}

    def reload_if_changed(self) -> bool:
        changed = self.user_file.reload_if_changed()
        if changed:
            self.cache.clear()
        return changed

    async def authenticate(self, credentials: Credentials) -> str | None:
        """The user name when the credentials are right, else None (same cost for unknown users)."""
        snapshot = self.user_file.snapshot
        key = self.cache.key(credentials)
        cached = self.cache.get(key, snapshot.generation)
        if cached is not None:
            return cached
        pending = self._in_flight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await self._verify(credentials, snapshot)
            if result is not None and self.user_file.snapshot is snapshot:
                self.cache.put(key, result, snapshot.generation)
            future.set_result(result)
            return result
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: there may be no other waiter
            raise
        finally:
            del self._in_flight[key]

    async def _verify(self, credentials: Credentials, snapshot: UserSnapshot) -> str | None:
        stored = snapshot.users.users.get(credentials.username)
        known = stored is not None
        target = stored if stored is not None else snapshot.dummy
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._executor, htpasswd.verify, credentials.password, target)
        return credentials.username if ok and known else None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
