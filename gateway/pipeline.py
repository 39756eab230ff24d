"""The decision for one request, whichever transport carries it: parse → identify → authorize →
what to send the registry. Pure: no I/O, no waiting, no transport.

Both transports call these functions and nothing else to decide: the full path (app.handle, on
aiohttp) for every request it gets, the fast path (fastpath.allowed_outright, on its own
protocol) for the requests it can answer without waiting. Where a step must wait (a password to
check, an ext_authz program to ask, the catalog to filter, the token endpoint), the outcome says
so, and the fast path hands the request to the full path, which does the waiting and then asks
the same functions again. So a request gets the same decision on either path by construction,
not by a test that compares them (which stays, as a check).

The steps, as docker_auth's `doAuth` reads: `precheck` (what no login can change: an old
client, the token endpoint), then screening.screen (everything the registry reads), then
`token_identity` (a Bearer token:
verified, its user still valid, the directory's labels merged), `scope_check` (what the token
grants against what the operation needs), `decide` (the policy), `upstream_authorization` (the
token the registry gets in bearer mode).
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

from gateway.identity import Labels, merge_labels
from gateway.policy import Decision, acl_policy, default_policy, may_pull, within_scopes
from gateway.routes import PULL, Operation, Route
from gateway.state import Snapshot
from gateway.tokens.authority import TokenAuthority
from gateway.tokens.endpoint import TOKEN_PATH
from gateway.tokens.jwt_tokens import Claims, InvalidToken
from gateway.tokens.scopes import Scope, covers, needed

# The nginx recipe's filter for docker clients older than 1.6, which speak only the v1 protocol.
OLD_DOCKER_CLIENT = re.compile(r"(docker/1\.(3|4|5(?!\.[0-9]-dev))|Go ).*", re.DOTALL)


@dataclass(slots=True)  # made per login check, never changed: not frozen (docs/performance.md)
class Identity:
    """Who is asking: a user (None: anonymous) and, for a Bearer token, what the token grants."""

    user: str | None
    token_access: tuple[Scope, ...] | None = None
    basic: bool = False  # Basic credentials were sent
    labels: Labels | None = None  # the login's; None: the policy account's


# --- precheck ---------------------------------------------------------------------------------


class Precheck(enum.Enum):
    """What a request is before it is screened or anyone logs in."""

    REGISTRY = "registry"  # a registry request: screened, identified and decided next
    TOKEN_ENDPOINT = "token"  # the gateway's own /token (bearer mode)
    OLD_CLIENT = "old_client"  # 404, as the nginx recipe answers docker < 1.6


def precheck(block_old_clients: bool, bearer_mode: bool, user_agent: str, target: str) -> Precheck:
    """`target`: the request target as sent. Its two questions are also asked apart (the fast
    path asks the first once per header section, the second per request)."""
    if is_old_client(block_old_clients, user_agent):
        return Precheck.OLD_CLIENT
    if is_token_endpoint(bearer_mode, target):
        return Precheck.TOKEN_ENDPOINT
    return Precheck.REGISTRY


def is_old_client(block_old_clients: bool, user_agent: str) -> bool:
    """A docker client older than 1.6, when those are blocked (the nginx recipe's 404)."""
    return block_old_clients and OLD_DOCKER_CLIENT.fullmatch(user_agent) is not None


def is_token_endpoint(bearer_mode: bool, target: str) -> bool:
    """The gateway's own /token, which exists in bearer mode only."""
    return bearer_mode and target.partition("?")[0] == TOKEN_PATH


# --- identify ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    identity: Identity
    claims: Claims
    remembered_login: bool  # its user is a directory's or a program's: on a clock of its own


@dataclass(frozen=True, slots=True)
class TokenRefused:
    reason: str  # for the client and the log
    metric: str  # registry_gateway_tokens_total{outcome="rejected",reason=...}
    user: str | None = None  # whom a valid token named


def is_bearer(authorization: str | None) -> bool:
    return authorization is not None and authorization[:7].lower() == "bearer "


def still_valid(snapshot: Snapshot, user: str, remembered_labels: Labels | None) -> bool:
    """A token's user still exists (in the files, or a source that is not lasting, a directory
    or a program, verified it within cache_ttl: `remembered_labels`) and has not expired (tokens
    outlive neither)."""
    if user not in snapshot.credentials and remembered_labels is None:
        return False
    return not snapshot.account(user).expired(dt.datetime.now(dt.UTC))


def token_identity(
    authority: TokenAuthority,
    snapshot: Snapshot,
    authorization: str,
    remembered_labels: Callable[[str], Labels | None],
) -> TokenIdentity | TokenRefused:
    """Who a Bearer `authorization` stands for. `remembered_labels` gives the labels of a user
    whom a source that is not lasting verified within cache_ttl (None when none did), by name
    (Authenticator.remembered_labels)."""
    try:
        claims = authority.verify(authorization[7:].strip())
    except InvalidToken as exc:
        return TokenRefused(str(exc), "invalid")
    user = claims.subject or None
    remembered = remembered_labels(user) if user is not None else None
    if user is not None and not still_valid(snapshot, user, remembered):
        return TokenRefused("the token's user is no longer valid", "user", user)
    robot = snapshot.robots.get(user) if user is not None else None
    if robot is not None and claims.secret != robot.fingerprint():
        # Rotated since (robot rotate): the old secret's tokens end with it, not when they expire.
        return TokenRefused("the robot's secret changed since this token was issued", "user", user)
    labels = None
    if user is not None and remembered is not None:
        labels = merge_labels(snapshot.account(user).labels, remembered)
    elif user is not None and user in snapshot.robots:
        labels = snapshot.account(user).labels  # not in the policy's users: the robot's own
    return TokenIdentity(Identity(user, claims.access, labels=labels), claims, remembered is not None)


# --- authorize --------------------------------------------------------------------------------


class Scopes(enum.Enum):
    """A token's grant against what an operation needs."""

    NOT_A_TOKEN = "not_a_token"  # Basic or anonymous: the policy alone decides
    COVERED = "covered"
    COVERED_BUT_MOUNT = "covered_but_mount"  # all but pull on a mount's source: an ordinary upload
    INSUFFICIENT = "insufficient"  # 401 insufficient_scope


def scope_check(identity: Identity, operation: Operation) -> Scopes:
    """The catalog is the policy's to grant or filter for any valid token: no grant needed."""
    if identity.token_access is None:
        return Scopes.NOT_A_TOKEN
    outcome = Scopes.COVERED
    for wanted in needed(operation):
        if covers(identity.token_access, wanted) or operation.route is Route.CATALOG:
            continue
        if wanted.name == operation.mount_from and wanted.actions == {PULL}:
            outcome = Scopes.COVERED_BUT_MOUNT  # no pull on the source: as with Basic
            continue
        return Scopes.INSUFFICIENT
    return outcome


def decide(
    snapshot: Snapshot, admin_prefix: str, identity: Identity, operation: Operation, ip: str
) -> Decision:
    """The policy's decision: the policy file's ACL, or the seed default (`admin_prefix`) without
    one; for a robot, narrowed to its scopes (`narrowed`)."""
    if snapshot.policy is None:
        decision = default_policy(identity.user, operation, admin_prefix)
    else:
        decision = acl_policy(snapshot.policy, identity.user, operation, ip, identity.labels)
    return narrowed(snapshot, identity, operation, decision)


def narrowed(snapshot: Snapshot, identity: Identity, operation: Operation, decision: Decision) -> Decision:
    """`decision` (the policy's, or an ext_authz program's), within a robot's scopes."""
    robot = snapshot.robots.get(identity.user) if identity.user is not None else None
    return decision if robot is None else within_scopes(decision, robot, operation)


def pullable(snapshot: Snapshot, admin_prefix: str, identity: Identity, ip: str) -> Callable[[str], bool]:
    """Whether the user may pull a repository: what a filtered catalog shows."""
    user = identity.user
    robot = snapshot.robots.get(user) if user is not None else None
    policy = snapshot.policy

    def visible(name: str) -> bool:
        if robot is not None and not robot.allowed("repository", name, frozenset({PULL})):
            return False
        if policy is None:
            return user is not None
        return may_pull(policy, user, name, ip, identity.labels)

    return visible


# --- forward ----------------------------------------------------------------------------------


def upstream_authorization(
    authority: TokenAuthority | None, identity: Identity, operation: Operation, authorization: str | None
) -> str | None:
    """The Authorization header the registry gets, in bearer mode (a registry behind may check
    tokens itself, `auth: token`, with the same key): the client's own token once the request is
    authorized, or one minted for exactly what is forwarded. The catalog is read with a token of
    the gateway's, since a client's token need not cover it. None in Basic mode."""
    if authority is None:
        return None
    if identity.token_access is not None and operation.route is not Route.CATALOG:
        return f"Bearer {(authorization or '')[7:].strip()}"
    return f"Bearer {authority.token_for(identity.user or '', needed(operation))}"
