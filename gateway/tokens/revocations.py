"""Explicit revocation: `registry-gateway token revoke USER` records when; tokens issued to that
user before then (refresh tokens above all, since they live long) are refused, and so are those of
the rest of that second: `revoke` returns once it is over, and every token issued after that is
accepted.

One line per user, `USER<TAB>EPOCH-SECONDS`, in the `token_revocations` file, written atomically
under a lock; every gateway sharing the file (and the key) honours it, within reload_interval.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

from gateway.files import replace_atomically


class RevocationsError(Exception):
    """The revocations file exists but cannot be read; the last good set stays in force."""


def read(path: Path | None) -> dict[str, float]:
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise RevocationsError(f"{path}: cannot read: {exc}") from None
    revoked: dict[str, float] = {}
    for line in text.splitlines():
        user, sep, when = line.rpartition("\t")
        if sep and user:
            try:
                revoked[user] = max(revoked.get(user, 0.0), float(when))
            except ValueError:
                continue
    return revoked


def revocation_moment() -> float:
    """Now, as a revocation records it: milliseconds, cut rather than rounded (100.9996 rounded
    would be recorded as 101.000, refusing tokens of second 101 issued after `revoke` returned)."""
    return math.floor(time.time() * 1000) / 1000


def revoke(path: Path, user: str, moment: float | None = None) -> float:
    """Record that tokens issued to `user` until `moment` (now) are void, and return once the
    tokens issued from now on are accepted (within a second: see first_accepted_second); returns
    the time recorded."""
    moment = revocation_moment() if moment is None else moment
    real = Path(os.path.realpath(path))  # one lock for every way to the file, as it is replaced
    lock_path = real.with_name(real.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current = read(path)
        current[user] = moment
        text = "".join(f"{name}\t{when:.3f}\n" for name, when in sorted(current.items()))
        replace_atomically(path, text.encode("utf-8"), new_mode=0o644)
    finally:
        os.close(fd)
    wait_until_accepted(moment)
    return moment


def wait_until_accepted(moment: float) -> None:
    """Return once tokens issued now are accepted after a revocation at `moment`: a login right
    after `token revoke` returns must get a token that works. Gateways on other machines are only
    as close as their clocks are."""
    while (left := first_accepted_second(moment) - time.time()) > 0:
        time.sleep(left)


def merged(*sources: Mapping[str, float]) -> dict[str, float]:
    """One mapping of user -> latest revocation from several (the file's, Redis's)."""
    revoked: dict[str, float] = {}
    for source in sources:
        for user, when in source.items():
            revoked[user] = max(revoked.get(user, 0.0), when)
    return revoked


def first_accepted_second(revoked_at: float) -> int:
    """The issue time (`iat`) from which a user's tokens are accepted again after a revocation.

    Tokens carry whole seconds (an integer `iat`, which distribution 2.8 requires), so a token of
    the revocation's own second may have been issued before it or after it, and cannot be told
    apart: all of them are refused, since accepting one issued before would undo the revocation.
    `revoke` waits for the next second before returning, so that no token issued after it
    returned is refused. (The recorded time keeps its fractions: the file tells when, and gateways
    that compared `iat <= recorded` decide the same.)"""
    return math.floor(revoked_at) + 1


def is_revoked(revoked: Mapping[str, float], user: str, issued: float) -> bool:
    cutoff = revoked.get(user)
    return cutoff is not None and issued < first_accepted_second(cutoff)
