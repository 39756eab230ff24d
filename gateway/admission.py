"""Admitting a request on the fast path: the pipeline's decision from what is verified already
(a cached login, a valid token), for the requests that need no waiting. The transport
(gateway.http.fastpath) parses the head and asks `allowed_outright`; a Forward comes back when
the answer is "allowed", None when the full path must answer, and then decides the same way.

Also what makes that cheap for a client that sends the same head again and again: the identity
its credentials proved, remembered per connection and per kept header section (IdentityMemo).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from gateway import forwarding, immutable, pipeline
from gateway.authn import Authenticator, Malformed, parse_basic_authorization
from gateway.config import Settings
from gateway.http.fastpath import Forward, ParsedHead
from gateway.login import before_account_ends, login_if_cached
from gateway.pipeline import Identity, Scopes
from gateway.policy import Outcome
from gateway.routes import Operation, Route
from gateway.screening import Refusal, screen, screen_headers
from gateway.shared.lockout import SharedLockout
from gateway.state import Snapshot
from gateway.tokens.authority import TokenAuthority


class Deciding(Protocol):
    """What admission reads of the application (gateway.app.Gateway)."""

    settings: Settings
    authority: TokenAuthority | None
    authenticator: Authenticator
    lockout: SharedLockout


@dataclass(slots=True)
class IdentityMemo:
    """A connection's last identity, and a kept section's (see Section.memo): one client sends
    the same credentials request after request, and checking them again (base64, a keyed hash,
    the login cache, the lockout, the account) is the largest part of a decision. Reused for at
    most MEMO_SECONDS, for the same Authorization header, client address and users-and-rules
    generation, and never past what vouched for it: the login cache entry, the account's expiry,
    a token's expiry, the token revocations and signing keys in force (any reload of them ends
    it). Not for directory users' tokens (their labels expire on a clock of their own) nor
    anonymous requests (nothing to check)."""

    authorization: str | None = None
    address: str = ""
    generation: int = -1
    until: float = 0.0  # time.monotonic()
    identity: Identity | None = None
    # A token's: the revocations and keys it was checked against (replaced on every reload).
    revoked: object = None
    verifier: object = None
    cache_key: bytes | None = None  # a Basic login's entry in the login cache, still to be there


MEMO_SECONDS = 1.0


def allowed_outright(
    gateway: Deciding, head: ParsedHead, remote: str, scheme: str, memo: IdentityMemo | None = None
) -> Forward | None:
    """The decision `app.handle` makes, for requests that need no waiting: a Forward when the
    answer is "allowed", None when the full path must answer (it then decides the same way,
    with every refusal, challenge and log line of its own). No side effects."""
    settings = gateway.settings
    section = head.section
    headers = section.headers
    view = section.view
    authority = gateway.authority
    if authority is not None and pipeline.is_token_endpoint(True, head.target):
        return None  # the token endpoint (pipeline.precheck's second question)
    if view is None:  # once per section (see Section)
        if pipeline.is_old_client(settings.block_old_clients, headers.get("User-Agent", "")):
            return None  # pipeline.precheck's first question: no view kept, asked again
        host = headers.get("Host", "")
        if not forwarding.valid_host(host):
            return None
        view = forwarding.client_view(remote, scheme, host, headers, settings.trusted_proxies)
        section.authorization = headers.get("Authorization")
        section.view = view
    if view.unreadable:
        return None  # refused by the full path (400)
    method = head.method
    facts = section.screened.get(method)
    if facts is None:  # once per section and method
        facts = section.screened[method] = screen_headers(method, headers)
    screened = screen(method, head.target, headers, facts)
    if isinstance(screened, Refusal) or screened.has_body or screened.close_after or screened.expect_continue:
        return None
    operation = screened.operation
    if not isinstance(operation, Operation):
        return None
    snapshot = gateway.authenticator.store.snapshot
    authorization = section.authorization

    now = time.monotonic()
    identity = _remembered(gateway, memo, authorization, view.address, snapshot.generation, now)
    if identity is None:
        identity = _remembered(gateway, section.memo, authorization, view.address, snapshot.generation, now)
    if identity is not None:
        user = identity.user
        if (
            user is not None
            and identity.basic
            and gateway.lockout.locked(view.address, user, now) is not None
        ):
            return None  # as login_if_cached: a locked pair is the full path's to answer (429)
    else:
        found = _identity(gateway, authorization, view.address, snapshot)
        if found is None:
            return None
        identity, until, cache_key = found
        if until > now:
            for remembering in (memo, section.memo):
                if remembering is not None:
                    remembering.cache_key = cache_key
                    remembering.authorization = authorization
                    remembering.address = view.address
                    remembering.generation = snapshot.generation
                    remembering.until = min(now + MEMO_SECONDS, until)
                    remembering.identity = identity
                    if authority is not None:
                        remembering.revoked, remembering.verifier = authority.revoked, authority.verifier

    if identity.token_access is not None:  # Basic and anonymous need no scope check
        scopes = pipeline.scope_check(identity, operation)
        if scopes is not Scopes.COVERED:
            return None  # a refusal, or a mount to drop: the full path's
        if operation.route is Route.BASE:
            upstream = pipeline.upstream_authorization(authority, identity, operation, authorization)
            return Forward(operation, view, identity.user, None, upstream)

    decision = pipeline.decide(snapshot, settings.admin_prefix, identity, operation, view.address)
    if decision.outcome is not Outcome.ALLOW or decision.drop_mount or decision.filter_catalog:
        return None
    if snapshot.policy is not None and immutable.guard(snapshot.policy.immutable, operation) is not None:
        return None  # the registry must be looked at first: the full path's (app._guarded)
    if identity.basic:
        gateway.authenticator.cache.hits += 1  # the login cache answered (or the memo, for it)
    upstream = (
        None
        if authority is None
        else pipeline.upstream_authorization(authority, identity, operation, authorization)
    )
    return Forward(operation, view, identity.user, decision.rule, upstream)


def _remembered(
    gateway: Deciding,
    memo: IdentityMemo | None,
    authorization: str | None,
    address: str,
    generation: int,
    now: float,
) -> Identity | None:
    """The identity `memo` holds, if it still holds for these credentials (see IdentityMemo)."""
    if memo is None or memo.identity is None:
        return None
    authority = gateway.authority
    if (
        memo.authorization == authorization
        and memo.address == address
        and memo.generation == generation
        and now < memo.until
        and (memo.cache_key is None or gateway.authenticator.cache.holds(memo.cache_key))
        and (authority is None or (memo.revoked is authority.revoked and memo.verifier is authority.verifier))
    ):
        return memo.identity
    return None


def _identity(
    gateway: Deciding, authorization: str | None, address: str, snapshot: Snapshot
) -> tuple[Identity, float, bytes | None] | None:
    """Who sends `authorization`, from what is verified already (`app._identify` without the
    waiting), and until when (time.monotonic()) a connection may take that as said without a
    change to the users: the login cache entry's or the token's end, the account's expiry (0.0:
    not to be remembered), and a Basic login's login cache key. None: the full path must tell."""
    authority = gateway.authority
    if authority is not None and authorization is not None and pipeline.is_bearer(authorization):
        found = pipeline.token_identity(
            authority, snapshot, authorization, gateway.authenticator.remembered_labels
        )
        if isinstance(found, pipeline.TokenRefused):
            return None
        until = 0.0  # directory users: not remembered
        user = found.identity.user
        if not found.remembered_login:
            until = time.monotonic() + (found.claims.expires - time.time())
            if user is not None:
                until = before_account_ends(snapshot, user, until)
        return found.identity, until, None
    credentials = parse_basic_authorization(authorization)
    if isinstance(credentials, Malformed):
        return None
    if credentials is None:
        return Identity(None), 0.0, None
    cached = login_if_cached(gateway.authenticator, gateway.lockout, credentials, address, snapshot)
    if cached is None:
        return None
    login, until, key = cached
    return Identity(login.user, basic=True, labels=login.labels), until, key
