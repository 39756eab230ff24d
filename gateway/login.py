"""Checking Basic credentials, the same for registry requests and token requests: the lockout
first (a locked pair is answered 429 whatever it sends: no password check, no cached login, so
the answer never depends on the password), then the password (cached, bcrypt off the event
loop), then the account's expiry date."""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import dataclass

from aiohttp import web

from gateway.authn import Authenticator, Credentials
from gateway.errors import error_response
from gateway.identity import Labels, Unavailable, Verified, merge_labels
from gateway.robots import robot_name
from gateway.shared.lockout import SharedLockout
from gateway.state import Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggedIn:
    user: str
    labels: Labels  # from the identity source and the policy's accounts together
    source: str


@dataclass(frozen=True)
class Locked:
    retry_after: float  # seconds


@dataclass(frozen=True)
class Refused:
    reason: str  # "bad_credentials", "expired" or "source_unavailable", as metrics label them


async def check_login(
    authenticator: Authenticator,
    lockout: SharedLockout,
    credentials: Credentials,
    client: str,
    snapshot: Snapshot,
) -> LoggedIn | Locked | Refused:
    user = credentials.username
    if robot_name(user) is not None:
        # A robot's secret is 32 random bytes checked by an HMAC: there is nothing to guess and
        # nothing a lock would protect, while a lock would let anyone at the CI runners' address
        # lock the robot out. Its failures are not counted, so no pair of it is ever locked.
        verdict = await authenticator.login(credentials, snapshot)
        return logged_in(verdict, snapshot) if isinstance(verdict, Verified) else Refused("bad_credentials")
    now = time.monotonic()
    wait = lockout.locked(client, user, now)  # no lock taken unless some pair is locked
    if wait is not None:
        # Even credentials verified before (in the login cache) are not used: were they, the
        # right password would get 200 and a wrong one 429, an oracle with no limit and no
        # bcrypt. So the user shares the lock of a guesser at the same address (behind NAT)
        # until the window ends; other addresses are not affected.
        return Locked(wait)
    cached = authenticator.cache.peek(authenticator.cache.key(credentials), snapshot.generation)
    if cached is not None:
        # Right, and checked before: no count to reset (the real user's requests behind a
        # shared address must not give a guesser there a fresh count).
        authenticator.cache.hits += 1
        return logged_in(cached[0], snapshot)
    # Counted before it is checked, so that guesses sent at once get `lockout_attempts` checks
    # in all, not one each.
    reserved = await lockout.reserve(client, user, now, credentials.password.encode())
    if reserved.wait is not None:
        return Locked(reserved.wait)
    verdict = await authenticator.login(credentials, snapshot)
    if isinstance(verdict, Unavailable):
        # Fail closed, and take the failure back: the user may have done nothing wrong.
        if reserved.counted:
            await lockout.release(client, user, time.monotonic())
        log.warning("login of %r refused: %s", user, verdict.reason)
        return Refused("source_unavailable")
    if not isinstance(verdict, Verified):
        return Refused("bad_credentials")  # counted already
    await lockout.succeeded(client, user)
    return logged_in(verdict, snapshot)


def login_if_cached(
    authenticator: Authenticator,
    lockout: SharedLockout,
    credentials: Credentials,
    client: str,
    snapshot: Snapshot,
) -> tuple[LoggedIn, float, bytes] | None:
    """`check_login` without waiting: the login when these exact credentials are in the login
    cache and pass every check, until when (time.monotonic()) that holds without a change to
    the users (the cache entry's end, the account's expiry), and the entry's cache key. None
    whenever `check_login` is needed to answer (a locked pair, no cached login, or a refusal),
    which it then does with the same outcome. The lockout comes first, as in check_login. The
    lookup is not counted: a caller that answers from it counts the hit (the full path counts
    its own lookup)."""
    if lockout.locked(client, credentials.username, time.monotonic()) is not None:
        return None
    cache = authenticator.cache
    key = cache.key(credentials)
    found = cache.peek(key, snapshot.generation)
    if found is None:
        return None
    verified, until = found
    login = logged_in(verified, snapshot)
    if not isinstance(login, LoggedIn):
        return None
    return login, before_account_ends(snapshot, login.user, until), key


def before_account_ends(snapshot: Snapshot, user: str, until: float) -> float:
    """`until` (time.monotonic()), or the moment the user's account expires if that is sooner."""
    expires = snapshot.account(user).expires
    if expires is not None:
        left = (expires - dt.datetime.now(dt.UTC)).total_seconds()
        return min(until, time.monotonic() + left)
    return until


def logged_in(verified: Verified, snapshot: Snapshot) -> LoggedIn | Refused:
    user = verified.user
    account = snapshot.account(user)
    if account.expired(dt.datetime.now(dt.UTC)):
        return Refused("expired")
    labels = without_robot_label(user, merge_labels(account.labels, verified.labels), snapshot)
    return LoggedIn(user, labels, verified.source)


def without_robot_label(user: str, labels: Labels, snapshot: Snapshot) -> Labels:
    """`robot` is the robots file's to give: a directory or a program saying it of a person would
    make policy entries for robots match them, without any scope to narrow them."""
    if "robot" in labels and user not in snapshot.robots:
        return {key: values for key, values in labels.items() if key != "robot"}
    return labels


def locked_response(locked: Locked) -> web.Response:
    return error_response(
        429,
        "TOOMANYREQUESTS",
        "too many failed logins; try again later",
        headers={"Retry-After": str(math.ceil(locked.retry_after))},
    )
