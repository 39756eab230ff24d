"""Password-guessing protection: too many failed logins for one (client address, user) pair locks it.

After `attempts` failures within `window` seconds of the first one, the pair is answered 429 with
`Retry-After` until the window ends, whatever it sends: no password is checked, no cached login
is used, so nothing in the answer depends on the secret tried and guessing costs the attacker
time and us nothing. The address is counted as `addresses.lockout_key` reads it (IPv6 by /64).

The counts live in one table of fixed size in shared memory, made before the workers are forked
(`supervise`), so every worker of one gateway counts the same failures: a guesser spreading its
connections over the workers gets `attempts` password checks in all, not per worker. Writes take
a POSIX record lock on the table's file, which the kernel releases if a worker dies holding it.
Replicas on other hosts count on their own (see docs/operations.md, "Password guessing").

The table is open-addressed: a pair's slot is one of PROBE slots from its keyed hash. When those
are all taken, an unlocked entry is replaced before a locked one, and the oldest first, so an
attack from many addresses can evict entries but never grow memory, and cannot free a locked
pair without first locking PROBE others, each with `attempts` failures of its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

from gateway.addresses import lockout_key

REPEAT_WINDOW = 10.0  # seconds within which the same wrong password is one attempt
DEFAULT_SLOTS = 1 << 16  # 3 MiB: far more pairs than a window sees outside an attack
PROBE = 8

# Header: the end of the latest lock (time.monotonic(), which is CLOCK_MONOTONIC, one clock for
# every process of the host), read without the lock: until then no pair can be locked.
_HEADER = struct.Struct("<d56x")
# A slot: the pair's keyed hash (zeros: empty), when its first counted failure was, how many
# there are, and the last failed attempt (a keyed hash of the password tried, and when).
_SLOT = struct.Struct("<16sdI4x8sd")
_EMPTY = bytes(16)


class Reserved(NamedTuple):
    wait: float | None  # seconds the pair must wait: it is locked, and nothing is checked
    counted: bool  # a failure was counted in advance (to be released if the check cannot decide)


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    started: float
    failures: int
    attempt: bytes
    attempt_at: float


class Lockout:
    def __init__(self, attempts: int, window: float, slots: int = DEFAULT_SLOTS) -> None:
        self.attempts = attempts
        self.window = window
        self.slots = max(slots, PROBE)
        self._secret = os.urandom(32)  # inherited by forked workers: one keying for all
        size = _HEADER.size + self.slots * _SLOT.size
        self._fd = _anonymous_file(size)
        self._map = mmap.mmap(self._fd, size)  # MAP_SHARED: forked workers see one table
        self.enabled = attempts > 0 and window > 0
        # The header's "locked until" as a float to index: read on every login, without a lock.
        self._locks_until = memoryview(self._map)[:8].cast("d")

    def retry_after(self, address: str, user: str, now: float) -> float | None:
        """Seconds the pair must wait, or None when it may try."""
        if not self.enabled:
            return None
        with self._locked(fcntl.LOCK_SH):
            return self._retry_after_locked(address, user, now)

    def locked(self, address: str, user: str, now: float) -> float | None:
        """`retry_after` for the request path's every login: one read of shared memory, unless
        some pair is locked right now."""
        if now >= self._locks_until[0] or not self.enabled:
            return None
        return self.retry_after(address, user, now)

    def reserve(self, address: str, user: str, now: float, secret: bytes) -> Reserved:
        """Before a secret is checked: count it as a failure now, so that guesses sent at once
        (on many connections, to many workers) get `attempts` checks in all, not every one that
        arrives before the first answer. The seconds to wait when the pair is locked; else
        whether a failure was counted (not for the same secret again within REPEAT_WINDOW, one
        guess; nor with the lockout off). A right secret then calls `succeeded` (which forgets the
        count), a check that could not decide `release` (which takes its failure back)."""
        if not self.enabled:
            return Reserved(None, counted=False)
        with self._locked(fcntl.LOCK_EX):
            wait = self._retry_after_locked(address, user, now)
            if wait is not None:
                return Reserved(wait, counted=False)
            return Reserved(None, counted=self._count(self._key(address, user), now, secret))

    def release(self, address: str, user: str, now: float) -> None:
        """Take back the failure `reserve` counted, for a check that could not decide (the
        directory down): the user may have done nothing wrong."""
        if not self.enabled:
            return
        key = self._key(address, user)
        with self._locked(fcntl.LOCK_EX):
            entry = self._find(key)
            if entry is not None and entry.failures > 0 and now < entry.started + self.window:
                _SLOT.pack_into(
                    self._map, _offset(entry.index), key, entry.started, entry.failures - 1, bytes(8), 0.0
                )

    def _retry_after_locked(self, address: str, user: str, now: float) -> float | None:
        """`retry_after` for a caller holding the table's lock."""
        entry = self._find(self._key(address, user))
        if entry is None or now >= entry.started + self.window or entry.failures < self.attempts:
            return None
        return entry.started + self.window - now

    def failed(self, address: str, user: str, now: float, secret: bytes | None = None) -> None:
        """Count a failed login after the fact (where no check was reserved: a refused refresh
        token, a wrong metrics token); the same `secret` again within REPEAT_WINDOW seconds is
        the same guess, not counted twice (containerd sends one wrong password twice: POST, then
        GET, maybe to two workers)."""
        if not self.enabled:
            return
        with self._locked(fcntl.LOCK_EX):
            self._count(self._key(address, user), now, secret)

    def _count(self, key: bytes, now: float, secret: bytes | None) -> bool:
        """One failure more for the pair, under the table's lock; False for a repeat."""
        attempt = (
            bytes(8) if secret is None else hashlib.blake2b(secret, key=self._secret, digest_size=8).digest()
        )
        entry = self._find(key)
        if entry is not None and now < entry.started + self.window:
            started, failures = entry.started, entry.failures
            if secret is not None and entry.attempt == attempt and now - entry.attempt_at < REPEAT_WINDOW:
                return False
            index = entry.index
        else:
            started, failures = now, 0
            index = entry.index if entry is not None else self._free_slot(key, now)
        failures += 1
        _SLOT.pack_into(self._map, _offset(index), key, started, failures, attempt, now)
        if failures >= self.attempts:
            until = started + self.window
            if until > _HEADER.unpack_from(self._map, 0)[0]:
                _HEADER.pack_into(self._map, 0, until)
        return True

    def succeeded(self, address: str, user: str) -> None:
        """A password checked and right: the pair's failures are forgotten."""
        if not self.enabled:
            return
        key = self._key(address, user)
        with self._locked(fcntl.LOCK_EX):
            entry = self._find(key)
            if entry is not None:
                _SLOT.pack_into(self._map, _offset(entry.index), _EMPTY, 0.0, 0, bytes(8), 0.0)

    def count(self) -> int:
        """Pairs with failures counted (some of them may be past their window). Not __len__: an
        empty table must not be falsy where a Lockout is optional."""
        with self._locked(fcntl.LOCK_SH):
            return sum(
                1 for index in range(self.slots) if self._map[_offset(index) : _offset(index) + 16] != _EMPTY
            )

    def close(self) -> None:
        self._locks_until.release()
        self._map.close()
        os.close(self._fd)

    def _key(self, address: str, user: str) -> bytes:
        return hashlib.blake2b(pair_name(address, user), key=self._secret, digest_size=16).digest()

    def _window(self, key: bytes) -> range:
        first = int.from_bytes(key[:8], "little") % self.slots
        return range(first, first + PROBE)

    def _find(self, key: bytes) -> _Entry | None:
        for position in self._window(key):
            index = position % self.slots
            found, started, failures, attempt, attempt_at = _SLOT.unpack_from(self._map, _offset(index))
            if found == key:
                return _Entry(index, started, failures, attempt, attempt_at)
        return None

    def _free_slot(self, key: bytes, now: float) -> int:
        """Where a new pair goes: an empty slot or one past its window, else the unlocked entry
        with the oldest start, else the lock that ends first."""
        best: tuple[int, float, int] | None = None
        for position in self._window(key):
            index = position % self.slots
            found, started, failures, _, _ = _SLOT.unpack_from(self._map, _offset(index))
            if found == _EMPTY or now >= started + self.window:
                return index
            rank = (1 if failures >= self.attempts else 0, started, index)
            if best is None or rank < best:
                best = rank
        assert best is not None
        return best[2]

    def _locked(self, operation: int) -> _FileLock:
        return _FileLock(self._fd, operation)


class _FileLock:
    """A POSIX record lock on the whole table: one per process (fcntl locks are), released by
    the kernel when the process ends."""

    def __init__(self, fd: int, operation: int) -> None:
        self._fd = fd
        self._operation = operation

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, self._operation)

    def __exit__(self, *_: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


def pair_name(address: str, user: str) -> bytes:
    """What one (address, user) pair is counted as, here and in Redis (gateway.shared.lockout).
    A name as a case-blind source (a directory, a program) may read it: ALICE, Alice and "alice "
    are one user's guesses, not three users' (distinct htpasswd names that differ only so share a
    count: a stricter limit, never a looser one)."""
    name = " ".join(unicodedata.normalize("NFKC", user).casefold().split())
    return f"{lockout_key(address)}\0{name}".encode()


def _offset(index: int) -> int:
    return _HEADER.size + index * _SLOT.size


def _anonymous_file(size: int) -> int:
    """A file of `size` zero bytes with no name: memory only where the system has memfd."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("registry-gateway-lockout", os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
    os.ftruncate(fd, size)
    return fd
