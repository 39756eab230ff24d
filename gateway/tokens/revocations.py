"""Explicit revocation: `registry-gateway token revoke USER` records when; tokens issued to that
user before then (refresh tokens above all, since they live long) are refused.

One line per user, `USER<TAB>EPOCH-SECONDS`, in the `token_revocations` file, written atomically
under a lock; every gateway sharing the file (and the key) honours it, within reload_interval.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Mapping
from pathlib import Path


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


def revoke(path: Path, user: str, now: float | None = None) -> float:
    """Record that tokens issued to `user` until now are void; returns the time recorded."""
    moment = time.time() if now is None else now
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current = read(path)
        current[user] = moment
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(f"{name}\t{when:.3f}\n" for name, when in sorted(current.items())))
        os.replace(temporary, path)
    finally:
        os.close(fd)
    return moment


def is_revoked(revoked: Mapping[str, float], user: str, issued: float) -> bool:
    cutoff = revoked.get(user)
    return cutoff is not None and issued <= cutoff
