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
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gateway import htpasswd
from gateway.state import AccessStore, Snapshot

log = logging.getLogger(__name__)

MAX_AUTHORIZATION_LENGTH = 4096


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
    if decoded == ":":
        # containers/image (skopeo, podman) answers a Basic challenge this way when it has no
        # credentials: it means anonymous, not a login attempt.
        return None
    if not sep or not username:
        return Malformed("credentials must be USER:PASSWORD")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in decoded):
        return Malformed("credentials contain control characters")
    return Credentials(username, password)


class CredentialCache:
    """Bounded LRU of verified credentials, keyed by HMAC(process key, user NUL password)."""

    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[str, int, float]] = OrderedDict()
        self.max_entries = max_entries
        self.ttl = ttl_seconds
        self.hits = 0
        self.misses = 0
        self.verifications = 0  # password hashes actually checked (what the cache saves)

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
        store: AccessStore,
        cache: CredentialCache,
        workers: int | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self._executor = ThreadPoolExecutor(
            max_workers=workers or min(4, (os.cpu_count() or 1) * 2),
            thread_name_prefix="bcrypt",
        )
        self._in_flight: dict[tuple[bytes, int], asyncio.Future[str | None]] = {}

    async def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read users and rules in a thread (parsing a big file must not stall streaming);
        forget cached logins on the event loop once a new snapshot is in place."""
        changed = await asyncio.to_thread(self.store.reload_if_changed, force)
        if changed:
            self.cache.clear()
        return changed

    def already_verified(self, credentials: Credentials, snapshot: Snapshot) -> str | None:
        """The user name if these exact credentials were verified recently (the login cache), with
        no password check: what a locked-out address may still use, since it teaches a guesser
        nothing."""
        return self.cache.get(self.cache.key(credentials), snapshot.generation)

    async def authenticate(self, credentials: Credentials, snapshot: Snapshot | None = None) -> str | None:
        """The user name when the credentials are right, else None (same cost for unknown users)."""
        snapshot = snapshot or self.store.snapshot
        key = self.cache.key(credentials)
        cached = self.cache.get(key, snapshot.generation)
        if cached is not None:
            return cached
        flight = (key, snapshot.generation)
        pending = self._in_flight.get(flight)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._in_flight[flight] = future
        try:
            result = await self._verify(credentials, snapshot)
            if result is not None and self.store.snapshot is snapshot:
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
            del self._in_flight[flight]

    async def _verify(self, credentials: Credentials, snapshot: Snapshot) -> str | None:
        stored = snapshot.users.get(credentials.username)
        known = stored is not None
        target = stored if stored is not None else snapshot.dummy
        loop = asyncio.get_running_loop()
        self.cache.verifications += 1
        ok = await loop.run_in_executor(self._executor, htpasswd.verify, credentials.password, target)
        return credentials.username if ok and known else None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
