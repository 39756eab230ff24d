"""The token endpoint, as the distribution token spec and its clients use it.

GET with Basic credentials (or none: an anonymous token), repeated `scope`, `service`, `account`,
`client_id`; POST with a form (`grant_type=password`). Answers `token` and `access_token` (the
same), `expires_in` and `issued_at` (RFC 3339). Wrong credentials are a 401, never an anonymous
token; missing rights are not an error: the token grants what the policy allows.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import MultiDict, MultiMapping

from gateway import acl
from gateway.audit import AuditRecord
from gateway.authn import Authenticator, Credentials, Malformed, parse_basic_authorization
from gateway.config import Settings
from gateway.errors import error_response
from gateway.http.forms import read_form
from gateway.identity import Labels
from gateway.login import Locked, Refused, check_login, locked_response
from gateway.metrics import Metrics
from gateway.policy import acl_request
from gateway.shared.lockout import SharedLockout
from gateway.state import Snapshot
from gateway.tokens.authority import TokenAuthority
from gateway.tokens.grants import grant, unmatched, within
from gateway.tokens.jwt_tokens import InvalidToken, claimed_subject
from gateway.tokens.scopes import Scope, merge, parse_scopes

TOKEN_PATH = "/token"
MAX_FORM_BYTES = 64 * 1024
AUDIT_TEXT = 256  # what a client-chosen field may take of an audit record


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    body = json.dumps({"error": error, "error_description": description})
    return web.Response(status=status, body=body, content_type="application/json")


# What a POST may also give in its query string: everything but passwords and tokens.
QUERY_KEYS = frozenset(
    {"grant_type", "username", "scope", "service", "client_id", "account", "offline_token", "access_type"}
)


# Asks the ext_authz program about one request: True granted, False denied, None failed.
AskProgram = Callable[[acl.Request], Awaitable[bool | None]]


async def _program_grants(
    ask_program: AskProgram | None,
    metrics: Metrics,
    scopes: list[Scope],
    user: str | None,
    snapshot: Snapshot,
    client: str,
    labels: Labels | None,
) -> list[Scope]:
    """Scopes no ACL entry matches, granted by the ext_authz program (docker_auth asks its
    authorizers in turn; the ACL first)."""
    policy = snapshot.policy
    if ask_program is None or policy is None or policy.ext_authz is None:
        return []
    granted = []
    for scope in unmatched(scopes, user, policy, client, labels):
        answer = await ask_program(
            acl_request(policy, user, "repository", scope.name, scope.actions, client, labels)
        )
        if answer is None:
            metrics.auth_failures.labels("ext_authz_failed").inc()
        elif answer:
            granted.append(scope)
    return granted


async def token_endpoint(
    request: web.BaseRequest,
    settings: Settings,
    authority: TokenAuthority,
    authenticator: Authenticator,
    lockout: SharedLockout,
    metrics: Metrics,
    record: AuditRecord,
    client: str,
    ask_program: AskProgram | None = None,
) -> web.StreamResponse:
    record.operation = "token"
    params: MultiMapping[str]
    credentials: Credentials | Malformed | None
    if request.method == "GET":
        params = request.query
        credentials = parse_basic_authorization(request.headers.get("Authorization"))
    elif request.method == "POST":
        form = await read_form(request, settings.body_timeout, MAX_FORM_BYTES)
        if form is None:
            return _oauth_error(400, "invalid_request", "expected a form of at most 64 KiB")
        # As Go's FormValue and docker_auth read a POST: the body's values, then the query's;
        # but no secret from a URL, which every proxy in front would log.
        form.extend((key, value) for key, value in request.query.items() if key in QUERY_KEYS)
        params = form
        grant_type = form.get("grant_type", "")
        if grant_type == "refresh_token" and authority.refresh_lifetime:
            return await _refresh(
                form, settings, authority, authenticator, lockout, metrics, record, client, ask_program
            )
        if grant_type != "password":
            # containerd then asks again with GET and Basic credentials.
            return _oauth_error(400, "unsupported_grant_type", "use grant_type=password, or GET")
        username, password = form.get("username", ""), form.get("password", "")
        if not username:
            return _oauth_error(400, "invalid_request", "username is required")
        # The same limits as Basic credentials: length, and no control characters.
        checked = parse_basic_authorization(
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        )
        if not isinstance(checked, Credentials) or checked.username != username:
            return _oauth_error(400, "invalid_request", "malformed username or password")
        credentials = checked
    else:
        return error_response(405, "UNSUPPORTED", "the token endpoint takes GET and POST")

    refused = _other_service(params, authority, metrics)
    if refused is not None:
        return refused
    record.client_id = (params.get("client_id") or "")[:AUDIT_TEXT] or None
    scopes = parse_scopes(params.getall("scope", []))  # merged by name
    record.scopes_requested = [str(scope) for scope in scopes]

    snapshot = authenticator.store.snapshot
    user: str | None = None
    labels: Labels | None = None
    challenge = {"WWW-Authenticate": f'Basic realm="{settings.realm}"'}
    if isinstance(credentials, Malformed):
        metrics.tokens.labels("rejected", "malformed").inc()
        return error_response(401, "UNAUTHORIZED", "malformed credentials", headers=challenge)
    if credentials is None and snapshot.policy is not None and not snapshot.policy.anonymous:
        # As docker_auth answers when no anonymous account is configured, and as the requests
        # themselves would be answered: credentials are needed.
        metrics.tokens.labels("rejected", "anonymous").inc()
        return error_response(401, "UNAUTHORIZED", "authentication required", headers=challenge)
    if credentials is not None:
        record.user = credentials.username[:AUDIT_TEXT]
        account = params.get("account")
        if account and account != credentials.username:
            return error_response(400, "UNSUPPORTED", "account does not match the credentials")
        login = await check_login(authenticator, lockout, credentials, client, snapshot)
        if isinstance(login, Locked):
            record.decision = "locked"
            metrics.tokens.labels("rejected", "locked").inc()
            return locked_response(login)
        if isinstance(login, Refused):
            metrics.tokens.labels("rejected", login.reason).inc()
            message = "account expired" if login.reason == "expired" else "authentication required"
            return error_response(401, "UNAUTHORIZED", message, headers=challenge)
        user = login.user
        labels = login.labels

    offline = params.get("offline_token", "").lower() == "true" or params.get("access_type") == "offline"
    refresh = None
    # Refresh tokens are tied to the user's entry in the files; directory users log in again.
    if offline and user is not None and authority.refresh_lifetime and user in snapshot.credentials:
        refresh = authority.issue_refresh(user, snapshot.credentials[user])
    extra = await _program_grants(ask_program, metrics, scopes, user, snapshot, client, labels)
    return _answer(
        authority, metrics, record, snapshot, settings, scopes, user, client, refresh, labels, extra
    )


def _other_service(
    params: MultiMapping[str], authority: TokenAuthority, metrics: Metrics
) -> web.Response | None:
    """The answer to a request for another service's token, whatever the grant: the token would
    carry our audience all the same, and a client asking for another is misconfigured."""
    service = params.get("service")
    if service is None or service == authority.service:
        return None
    metrics.tokens.labels("rejected", "service").inc()
    return error_response(400, "UNSUPPORTED", authority.wrong_service(service))


def _answer(
    authority: TokenAuthority,
    metrics: Metrics,
    record: AuditRecord,
    snapshot: Snapshot,
    settings: Settings,
    scopes: list[Scope],
    user: str | None,
    client: str,
    refresh: str | None,
    labels: Labels | None = None,
    extra: list[Scope] | None = None,
) -> web.Response:
    if labels is None and user is not None and user in snapshot.robots:
        labels = snapshot.account(user).labels  # a robot's own: the policy has no account for it
    granted = grant(scopes, user, snapshot.policy, settings.admin_prefix, client, labels)
    if extra:
        granted = merge(granted + extra)
    granted = within(granted, snapshot.robots.get(user) if user is not None else None)
    record.scopes_granted = [str(scope) for scope in granted]
    robot = snapshot.robots.get(user) if user is not None else None
    token, issued = authority.issue(user or "", granted, robot.fingerprint() if robot is not None else None)
    metrics.tokens.labels("issued", "").inc()
    record.decision = "allow"
    issued_at = dt.datetime.fromtimestamp(issued, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    answer: dict[str, object] = {
        "token": token,
        "access_token": token,
        "expires_in": authority.lifetime,
        "issued_at": issued_at,
    }
    if refresh is not None:
        # docker login then stores this as its identity token, and no password.
        answer["refresh_token"] = refresh
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


async def _refresh(
    form: MultiDict[str],
    settings: Settings,
    authority: TokenAuthority,
    authenticator: Authenticator,
    lockout: SharedLockout,
    metrics: Metrics,
    record: AuditRecord,
    client: str,
    ask_program: AskProgram | None = None,
) -> web.Response:
    """grant_type=refresh_token: what moby, containerd and skopeo send once they hold one. A
    refresh token is a secret like a password: the lockout of the pair (client, the user the
    token claims) is consulted before it is checked, and a refused one counts as a failure."""
    refused = _other_service(form, authority, metrics)
    if refused is not None:
        return refused
    snapshot = authenticator.store.snapshot
    record.client_id = (form.get("client_id") or "")[:AUDIT_TEXT] or None
    scopes = parse_scopes(form.getall("scope", []))  # merged by name
    record.scopes_requested = [str(scope) for scope in scopes]
    token = form.get("refresh_token", "")
    claimed = claimed_subject(token)
    record.user = claimed[:AUDIT_TEXT] or None
    # Counted for the user the token claims only when that is a user of the files (the only
    # users refresh tokens are issued to); a made-up name costs the sender nothing to write, and
    # each would take a slot of the lockout's table: all those are one pair, the client's.
    if claimed not in snapshot.credentials:
        claimed = ""
    wait = await lockout.retry_after(client, claimed, time.monotonic())
    if wait is not None:
        record.decision = "locked"
        metrics.tokens.labels("rejected", "locked").inc()
        return locked_response(Locked(wait))
    try:
        user = authority.refresh_subject(token, snapshot.credentials)
    except InvalidToken as exc:
        await lockout.failed(client, claimed, time.monotonic(), token.encode())
        metrics.tokens.labels("rejected", "refresh").inc()
        return _oauth_error(401, "invalid_grant", str(exc))
    record.user = user
    if snapshot.account(user).expired(dt.datetime.now(dt.UTC)):
        metrics.tokens.labels("rejected", "expired").inc()
        return _oauth_error(401, "invalid_grant", "account expired")
    extra = await _program_grants(ask_program, metrics, scopes, user, snapshot, client, None)
    return _answer(authority, metrics, record, snapshot, settings, scopes, user, client, None, None, extra)
