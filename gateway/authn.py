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
import datetime as dt
import hmac
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gateway import htpasswd, robots
from gateway.identity import IdentitySource, Labels, Probing, Rejected, Unknown, Verdict, Verified
from gateway.identity.external import ExternalSource
from gateway.identity.ldap import LdapSettings, LdapSource
from gateway.identity.robots import RobotSource
from gateway.robots import Robot
from gateway.state import AccessStore, Snapshot

log = logging.getLogger(__name__)

MAX_AUTHORIZATION_LENGTH = 4096


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***')"


_CONTROL = re.compile("[\x00-\x1f\x7f]")


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
    if _CONTROL.search(decoded) is not None:
        return Malformed("credentials contain control characters")
    return Credentials(username, password)


class CredentialCache:
    """Bounded LRU of verified credentials, keyed by HMAC(process key, user NUL password)."""

    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[Verified, int, float]] = OrderedDict()
        self.max_entries = max_entries
        self.ttl = ttl_seconds
        self.hits = 0
        self.misses = 0
        self.verifications = 0  # password hashes actually checked (what the cache saves)

    def key(self, credentials: Credentials) -> bytes:
        message = credentials.username.encode() + b"\0" + credentials.password.encode()
        return hmac.digest(self._key, message, "sha256")

    def get(self, key: bytes, generation: int) -> Verified | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] != generation or entry[2] < time.monotonic():
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def peek(self, key: bytes, generation: int) -> tuple[Verified, float] | None:
        """Like `get`, but counted by the caller (only if the login is then used), and with the
        entry's end of life (time.monotonic())."""
        entry = self._entries.get(key)
        if entry is None or entry[1] != generation or entry[2] < time.monotonic():
            return None
        self._entries.move_to_end(key)
        return entry[0], entry[2]

    def holds(self, key: bytes) -> bool:
        """Whether an entry is still kept for `key` (not evicted to make room, nor cleared)."""
        return key in self._entries

    def put(self, key: bytes, verified: Verified, generation: int) -> None:
        if self.max_entries <= 0 or self.ttl <= 0:
            return
        self._entries[key] = (verified, generation, time.monotonic() + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class FileUsers:
    """The htpasswd file's users and the policy's static users (one snapshot's): a lasting source,
    checked first."""

    name = "htpasswd"
    lasting = True  # a user stays a user until the files change
    last_problem: str | None = None  # reading the files is the reload's business, not a login's

    def __init__(
        self,
        users: Mapping[str, htpasswd.StoredHash],
        check: Callable[[str, htpasswd.StoredHash], Awaitable[bool]],
    ) -> None:
        self._users = users
        self._check = check

    async def verify(self, user: str, password: str) -> Verdict:
        stored = self._users.get(user)
        if stored is None:
            return Unknown()
        return Verified(user) if await self._check(password, stored) else Rejected()


class Authenticator:
    def __init__(
        self,
        store: AccessStore,
        cache: CredentialCache,
        workers: int | None = None,
        robots_last_used: Path | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.robots_last_used = robots_last_used  # where robots' logins are recorded (None: not)
        self._executor = ThreadPoolExecutor(
            max_workers=workers or min(4, (os.cpu_count() or 1) * 2),
            thread_name_prefix="bcrypt",
        )
        self._in_flight: dict[tuple[bytes, int], asyncio.Future[Verdict]] = {}
        self._ldap: LdapSource | None = None
        self._external: ExternalSource | None = None
        self._robots: tuple[Mapping[str, Robot], RobotSource] | None = None
        # Labels of users a source that is not lasting (a directory, a program) verified, for
        # requests that carry a token, not a password; kept as long as a cached login (cache_ttl).
        self._recent_logins: dict[str, tuple[Labels, float]] = {}

    async def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read users and rules in a thread (parsing a big file must not stall streaming);
        forget cached logins on the event loop once a new snapshot is in place."""
        changed = await asyncio.to_thread(self.store.reload_if_changed, force)
        if changed:
            self.cache.clear()
            self._recent_logins.clear()
        return changed

    def ldap_source(self, snapshot: Snapshot | None = None) -> LdapSource | None:
        """The directory of the current rules (one source, kept while its settings stay)."""
        snapshot = snapshot or self.store.snapshot
        settings: LdapSettings | None = snapshot.policy.ldap if snapshot.policy is not None else None
        if settings is None:
            return None
        if self._ldap is None or self._ldap.settings != settings:
            self._ldap = LdapSource(settings)
        return self._ldap

    def sources(self, snapshot: Snapshot) -> list[IdentitySource]:
        """The identity sources in the order they are asked: robots (the only source of robot+
        names), the files (htpasswd and the policy's static users), LDAP, then ext_auth. The dummy
        check after them is not a source (_verify)."""
        found: list[IdentitySource] = [
            self._robot_source(snapshot),
            FileUsers(snapshot.users, self._check_hash),
        ]
        directory = self.ldap_source(snapshot)
        if directory is not None:
            found.append(directory)
        settings = snapshot.policy.external if snapshot.policy is not None else None
        if settings is not None:
            if self._external is None or self._external.settings != settings:
                self._external = ExternalSource(settings)
            found.append(self._external)
        return found

    def _robot_source(self, snapshot: Snapshot) -> RobotSource:
        """One per snapshot (it remembers when it last recorded each robot's use)."""
        if self._robots is None or self._robots[0] is not snapshot.robots:
            used = self.robots_last_used
            record = None
            if used is not None:

                def record(name: str) -> None:
                    robots.record_use(used, name, dt.datetime.now(dt.UTC))

            self._robots = (snapshot.robots, RobotSource(snapshot.robots, record))
        return self._robots[1]

    def probing_source(self, snapshot: Snapshot | None = None) -> Probing | None:
        """The source that can say whether it answers now (a directory: `Probing`), for /readyz
        and the directory_up metric; None when no configured source can."""
        for source in self.sources(snapshot or self.store.snapshot):
            if isinstance(source, Probing):
                return source
        return None

    def remembered_labels(self, user: str) -> Labels | None:
        """The labels of a user whom a source that is not lasting (a directory, a program)
        verified within cache_ttl; None if there was no such login."""
        entry = self._recent_logins.get(user)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    async def authenticate(self, credentials: Credentials, snapshot: Snapshot | None = None) -> str | None:
        """The user name when the credentials are right, else None (same cost for unknown users)."""
        verdict = await self.login(credentials, snapshot)
        return verdict.user if isinstance(verdict, Verified) else None

    async def login(self, credentials: Credentials, snapshot: Snapshot | None = None) -> Verdict:
        """Verified (user, labels, source), Rejected, or Unavailable (a source could not decide)."""
        snapshot = snapshot or self.store.snapshot
        key = self.cache.key(credentials)
        cached = self.cache.get(key, snapshot.generation)
        if cached is not None:
            return cached
        flight = (key, snapshot.generation)
        pending = self._in_flight.get(flight)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._in_flight[flight] = future
        try:
            result, source = await self._verify(credentials, snapshot)
            if isinstance(result, Verified) and self.store.snapshot is snapshot:
                self.cache.put(key, result, snapshot.generation)
                if source is not None and not source.lasting:
                    self._recent_logins.pop(result.user, None)
                    self._recent_logins[result.user] = (result.labels, time.monotonic() + self.cache.ttl)
                    while len(self._recent_logins) > max(1, self.cache.max_entries):
                        del self._recent_logins[next(iter(self._recent_logins))]
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

    async def _verify(
        self, credentials: Credentials, snapshot: Snapshot
    ) -> tuple[Verdict, IdentitySource | None]:
        """The first source that knows the name decides (each name is resolved by exactly one: a
        name in the htpasswd file is never looked up in the directory), with the source."""
        for source in self.sources(snapshot):
            verdict = await source.verify(credentials.username, credentials.password)
            if not isinstance(verdict, Unknown):
                return verdict, source
        # No source knows the name: the same bcrypt as for a wrong password, then refused.
        await self._check_hash(credentials.password, snapshot.dummy)
        return Rejected(), None

    async def _check_hash(self, password: str, stored: htpasswd.StoredHash) -> bool:
        """A password against a stored hash, in the thread pool (bcrypt releases the GIL)."""
        self.cache.verifications += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, htpasswd.verify, password, stored)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
