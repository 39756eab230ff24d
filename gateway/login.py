"""Checking Basic credentials, the same for registry requests and token requests: the lockout
first (no password check for a locked pair, unless these exact credentials were verified before),
then the password (cached, bcrypt off the event loop), then the account's expiry date."""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass

from aiohttp import web

from gateway.authn import Authenticator, Credentials
from gateway.errors import error_response
from gateway.lockout import Lockout
from gateway.state import Snapshot


@dataclass(frozen=True)
class LoggedIn:
    user: str


@dataclass(frozen=True)
class Locked:
    retry_after: float  # seconds


@dataclass(frozen=True)
class Refused:
    reason: str  # "bad_credentials" or "expired", as metrics label them


async def check_login(
    authenticator: Authenticator, lockout: Lockout, credentials: Credentials, client: str, snapshot: Snapshot
) -> LoggedIn | Locked | Refused:
    wait = lockout.retry_after(client, credentials.username, time.monotonic())
    if wait is not None:
        # Many clients may share one address (behind NAT, or docker's userland proxy, every
        # client is the bridge's address): a guesser there must not lock out the user, so
        # credentials verified before still work. They cost no bcrypt and teach nothing.
        user = authenticator.already_verified(credentials, snapshot)
        if user is None:
            return Locked(wait)
    else:
        user = await authenticator.authenticate(credentials, snapshot)
        if user is None:
            attempt = authenticator.cache.key(credentials)
            lockout.failed(client, credentials.username, time.monotonic(), attempt)
            return Refused("bad_credentials")
        lockout.succeeded(client, credentials.username)
    if snapshot.policy is not None and snapshot.policy.account(user).expired(dt.datetime.now(dt.UTC)):
        return Refused("expired")
    return LoggedIn(user)


def locked_response(locked: Locked) -> web.Response:
    return error_response(
        429,
        "TOOMANYREQUESTS",
        "too many failed logins; try again later",
        headers={"Retry-After": str(math.ceil(locked.retry_after))},
    )
