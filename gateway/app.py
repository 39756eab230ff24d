"""The request path: parse → authenticate → authorize → stream to the registry and back.

Three outcomes for every request: allowed (forwarded), denied (401/403 in the registry's error
format), or an error (502/504 for upstream failures, 500 for our own bugs, always logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway import __version__, acl, admission, catalog, forwarding, immutable, pipeline, tag_lookup
from gateway.admission import IdentityMemo
from gateway.audit import AuditLog, AuditRecord, new_record, operation_name
from gateway.authn import (
    Authenticator,
    CredentialCache,
    Malformed,
    parse_basic_authorization,
)
from gateway.config import Settings
from gateway.errors import API_VERSION, API_VERSION_HEADER, SERVER_NAME, error_response
from gateway.external_authz import ExternalAuthorizer
from gateway.http import answers
from gateway.http.fastpath import Forward, ParsedHead
from gateway.http.relay import ClientTooSlow, RegistryCut, relay
from gateway.http.server import APPLICATION_KEY
from gateway.http.upstream import NoConnection, UpstreamError, UpstreamPool, UpstreamTimeout
from gateway.identity.external import ExternalSettings
from gateway.lockout import Lockout
from gateway.login import Locked, Refused, check_login, locked_response
from gateway.metrics import Metrics
from gateway.pipeline import Identity, Precheck, Scopes
from gateway.policy import Decision, Outcome, acl_request, may_pull
from gateway.policyfile import Policy
from gateway.routes import MOUNT_KEYS, PULL, Operation, Route, RouteError, without_query_keys
from gateway.screening import Admitted, Refusal, screen
from gateway.shared.link import RedisLink
from gateway.shared.lockout import SharedLockout
from gateway.shared.revocations import SharedRevocations
from gateway.shared.tag_locks import WAIT_SECONDS, SharedTagLocks, TagBusy
from gateway.state import AccessStore, Snapshot
from gateway.tokens.authority import TokenAuthority
from gateway.tokens.endpoint import TOKEN_PATH, token_endpoint
from gateway.tokens.scopes import Scope, needed
from gateway.ui.paths import is_ui_path

if TYPE_CHECKING:
    from gateway.ui.pages import Pages

log = logging.getLogger(__name__)

# The least a client must send of a request body in every body_timeout (a slow trickle is cut).
MIN_BODY_BYTES = 16 * 1024

SETTINGS_KEY = web.AppKey("settings", Settings)
AUTHENTICATOR_KEY = web.AppKey("authenticator", Authenticator)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
METRICS_KEY = web.AppKey("metrics", Metrics)
AUDIT_KEY = web.AppKey("audit", AuditLog)
LOCKOUT_KEY = web.AppKey("lockout", SharedLockout)
AUDIT_RECORD = web.RequestKey("audit_record", AuditRecord)
CLOSE_AFTER = web.RequestKey("close_after", bool)
CLIENT_VIEW = web.RequestKey("client_view", forwarding.ClientView)
UPSTREAM_AUTHORIZATION = web.RequestKey("upstream_authorization", str)
AUTHORITY_KEY = web.AppKey("token_authority", TokenAuthority)


class UpstreamAborted(ConnectionResetError):
    """The registry failed after the response started: the client connection is cut, not completed."""


def _challenge_headers(
    settings: Settings,
    view: forwarding.ClientView | None,
    operation: Operation | None,
    error: str | None = None,
    basic: bool = False,
) -> dict[str, str]:
    """Basic, or in bearer mode the token challenge: realm (absolute, as the client reached us),
    service, the scope this operation needs, and why a token was refused. A client that sent
    Basic credentials is answered in Basic (curl, scripts), as Harbor does."""
    if settings.challenge == "basic" or basic or view is None:
        return {"WWW-Authenticate": f'Basic realm="{settings.realm}"'}
    realm = settings.token_realm or f"{view.scheme}://{view.host}{TOKEN_PATH}"
    # A quoted-string, as distribution writes it (%q): a service may hold quotes or backslashes.
    service = settings.token_service.replace("\\", "\\\\").replace('"', '\\"')
    parts = [f'realm="{realm}"', f'service="{service}"']
    wanted = needed(operation) if operation is not None else []
    if wanted:
        parts.append('scope="' + " ".join(str(scope) for scope in wanted) + '"')
    if error is not None:
        parts.append(f'error="{error}"')
    return {"WWW-Authenticate": "Bearer " + ",".join(parts)}


def _detail(operation: Operation | None) -> list[dict[str, str]] | None:
    if operation is None or operation.repository is None:
        return None
    return [
        {"Type": "repository", "Name": operation.repository, "Action": action}
        for action in sorted(operation.actions)
    ]


class BodyFailed(Exception):
    """The client's request body cannot be forwarded whole: answered with `status`, connection closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class RequestBody:
    """The client's body as the registry gets it: the bytes as sent (never decompressed), exactly
    the declared length, and a limit on how long the client may pause between bytes."""

    def __init__(
        self, request: web.BaseRequest, record: AuditRecord, declared_length: int | None, idle_timeout: float
    ) -> None:
        self._request = request
        self._record = record
        self._declared = declared_length
        self._idle_timeout = idle_timeout
        self.failure: BodyFailed | None = None

    def _fail(self, status: int, code: str, message: str) -> BodyFailed:
        self.failure = BodyFailed(status, code, message)
        return self.failure

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._request.content
        received = 0
        loop = asyncio.get_running_loop()
        window_started, window_bytes = loop.time(), 0
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    chunk = await content.readany()
            except TimeoutError:
                message = f"no request body bytes for {self._idle_timeout:g} s"
                raise self._fail(408, "REQUEST_TIMEOUT", message) from None
            except ConnectionError:
                raise  # the client went away: nothing to answer
            except Exception as exc:  # aiohttp's payload errors: bad chunking, a cut body
                if self._request.transport is None or self._request.transport.is_closing():
                    raise ConnectionResetError("client went away during the upload") from exc
                raise self._fail(400, "UNSUPPORTED", "malformed request body") from exc
            if not chunk:
                if self._declared is not None and received != self._declared:
                    # aiohttp enforces Content-Length; never send the registry fewer bytes than declared.
                    raise self._fail(400, "UNSUPPORTED", "request body shorter than its Content-Length")
                return
            received += len(chunk)
            self._record.bytes_in += len(chunk)
            # A byte now and then never trips the idle limit: ask for MIN_BODY_BYTES in every
            # body_timeout as well, which a dead-slow but honest link still sends.
            window_bytes += len(chunk)
            if loop.time() - window_started >= self._idle_timeout:
                if window_bytes < MIN_BODY_BYTES:
                    message = f"request body slower than {MIN_BODY_BYTES} bytes in {self._idle_timeout:g} s"
                    raise self._fail(408, "REQUEST_TIMEOUT", message)
                window_started, window_bytes = loop.time(), 0
            yield chunk


def _unauthorized(
    request: web.BaseRequest,
    operation: Operation | None,
    message: str,
    error: str | None = None,
    basic: bool = False,
) -> web.Response:
    headers = _challenge_headers(request[GATEWAY].settings, request.get(CLIENT_VIEW), operation, error, basic)
    return error_response(401, "UNAUTHORIZED", message, _detail(operation), headers)


def _upstream_token(request: web.BaseRequest, identity: Identity, operation: Operation) -> None:
    """What the registry gets as Authorization once a request is authorized (bearer mode)."""
    authorization = pipeline.upstream_authorization(
        request[GATEWAY].authority, identity, operation, request.headers.get("Authorization")
    )
    if authorization is not None:
        request[UPSTREAM_AUTHORIZATION] = authorization


async def _identify(
    request: web.BaseRequest, operation: Operation | None, snapshot: Snapshot
) -> Identity | web.Response:
    """Authenticate the request: a Bearer token (bearer mode), Basic credentials, or nobody."""
    record = request[AUDIT_RECORD]
    view = request[CLIENT_VIEW]
    metrics = request[GATEWAY].metrics
    authorization = request.headers.get("Authorization")
    authority = request[GATEWAY].authority
    if authority is not None and authorization is not None and pipeline.is_bearer(authorization):
        found = pipeline.token_identity(
            authority, snapshot, authorization, request[GATEWAY].authenticator.remembered_labels
        )
        if isinstance(found, pipeline.TokenRefused):
            record.user = found.user
            if found.metric == "invalid":
                log.info("refused a token from %s: %s", view.address, found.reason)
            metrics.tokens.labels("rejected", found.metric).inc()
            return _unauthorized(request, operation, found.reason, error="invalid_token")
        record.user = found.identity.user
        return found.identity

    authenticator = request[GATEWAY].authenticator
    credentials = parse_basic_authorization(authorization)
    if isinstance(credentials, Malformed):
        log.info("rejected authorization header from %s: %s", view.address, credentials.reason)
        metrics.auth_failures.labels("malformed").inc()
        return _unauthorized(request, operation, "authentication required")
    if credentials is None:
        return Identity(None)
    record.user = credentials.username
    login = await check_login(authenticator, request[GATEWAY].lockout, credentials, view.address, snapshot)
    if isinstance(login, Locked):
        record.decision = "locked"
        metrics.auth_failures.labels("locked").inc()
        return locked_response(login)
    if isinstance(login, Refused):
        if login.reason == "expired":
            log.info("refused expired account %r from %s", credentials.username, view.address)
        else:
            log.info("failed login for user %r from %s", credentials.username, view.address)
        metrics.auth_failures.labels(login.reason).inc()
        message = "account expired" if login.reason == "expired" else "authentication required"
        return _unauthorized(request, operation, message, basic=True)
    return Identity(login.user, basic=True, labels=login.labels)


async def _ask_ext_authz(
    request: web.BaseRequest,
    policy: Policy,
    program: ExternalSettings,
    repository: str,
    identity: Identity,
    operation: Operation,
    ip: str,
) -> Decision:
    """No ACL entry matched: the ext_authz program decides, as in docker_auth (fail closed)."""
    authorizer = request[GATEWAY].external_authorizer(program)
    asked = acl_request(
        policy, identity.user, "repository", repository, operation.actions, ip, identity.labels
    )
    granted = await authorizer.authorize(asked)
    if granted is None:
        request[GATEWAY].metrics.auth_failures.labels("ext_authz_failed").inc()
        return Decision(Outcome.DENY, "ext_authz failed (denied)")
    if not granted:
        return Decision(Outcome.DENY, "denied by ext_authz")
    # A mount needs pull on its source: by the ACL only (the program was asked about the target).
    drop_mount = operation.mount_from is not None and not may_pull(
        policy, identity.user, operation.mount_from, ip, identity.labels
    )
    return Decision(Outcome.ALLOW, "granted by ext_authz", drop_mount=drop_mount)


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    settings = request[GATEWAY].settings
    record = request[AUDIT_RECORD]
    record.decision = "refused"

    authority = request[GATEWAY].authority
    first = pipeline.precheck(
        settings.block_old_clients,
        authority is not None,
        request.headers.get("User-Agent", ""),
        request.raw_path,
    )
    if first is Precheck.OLD_CLIENT:
        return error_response(404, "UNSUPPORTED", "this docker client is too old")
    if first is Precheck.TOKEN_ENDPOINT and authority is not None:
        return await _token_request(request, authority)

    if settings.ui and is_ui_path(request.raw_path):
        page_view = _client_view(request)  # the registry's checks of the client, the same here
        if page_view is None:
            return error_response(400, "UNSUPPORTED", "missing or invalid Host header")
        if page_view.unreadable:
            return _unreadable_client(page_view)
        return await request[GATEWAY].pages().handle(request, page_view, record)

    # Everything the registry would read from this request, decided in one place.
    screened = screen(request.method, request.raw_path, request.headers)
    if isinstance(screened, Refusal):
        return error_response(screened.status, screened.code, screened.message)
    if screened.close_after:
        request[CLOSE_AFTER] = True
    route_error = screened.operation if isinstance(screened.operation, RouteError) else None
    operation = screened.operation if isinstance(screened.operation, Operation) else None
    if operation is not None:
        record.operation = operation_name(operation)
        record.repository = operation.repository
        record.reference = operation.reference

    view = _client_view(request)
    if view is None:
        return error_response(400, "UNSUPPORTED", "missing or invalid Host header")
    if view.unreadable:
        return _unreadable_client(view)
    record.decision = "challenge"

    # One snapshot of users and rules for the whole request, whatever reloads meanwhile.
    snapshot = request[GATEWAY].authenticator.store.snapshot
    identity = await _identify(request, operation, snapshot)
    if isinstance(identity, web.StreamResponse):
        return identity
    user = identity.user

    if route_error is not None or operation is None:
        # A request that names no operation: answered only after authentication, so that
        # anonymous clients are challenged first, as for any request they may not make.
        if user is None and identity.token_access is None:
            return _unauthorized(request, None, "authentication required")
        record.decision = "refused"  # the gateway's own answer to a request it cannot forward
        error = route_error or RouteError(404, "NOT_FOUND", "unknown registry API endpoint")
        return error_response(error.status, error.code, error.message)

    # A token must grant the operation, and the policy of now must still allow it.
    scopes = pipeline.scope_check(identity, operation)
    if scopes is Scopes.INSUFFICIENT:
        return _unauthorized(request, operation, "the token does not grant this", error="insufficient_scope")
    drop_mount = scopes is Scopes.COVERED_BUT_MOUNT
    if scopes is not Scopes.NOT_A_TOKEN and operation.route is Route.BASE:
        record.decision = "allow"
        _upstream_token(request, identity, operation)
        return await forward(request, settings, view, operation.target, screened)

    decision = pipeline.decide(snapshot, settings.admin_prefix, identity, operation, view.address)
    if (
        decision.outcome is Outcome.DENY
        and decision.rule is None
        and snapshot.policy is not None
        and snapshot.policy.ext_authz is not None
        and operation.repository is not None
    ):
        decision = await _ask_ext_authz(
            request,
            snapshot.policy,
            snapshot.policy.ext_authz,
            operation.repository,
            identity,
            operation,
            view.address,
        )
        decision = pipeline.narrowed(snapshot, identity, operation, decision)
    record.rule = decision.rule
    if decision.outcome is Outcome.CHALLENGE:
        return _unauthorized(request, operation, "authentication required", basic=identity.basic)
    if decision.outcome is Outcome.DENY:
        record.decision = "deny"
        log.info(
            "denied %s %s %s to %r: %s",
            request.method,
            operation.route.value,
            operation.repository,
            user,
            decision.reason,
        )
        return error_response(403, "DENIED", "requested access to the resource is denied", _detail(operation))
    record.decision = "allow"
    target = operation.target
    forwarded = operation
    if decision.drop_mount or drop_mount:
        log.info("mount from %s refused to %r: forwarded as an ordinary upload", operation.mount_from, user)
        target = without_query_keys(target, MOUNT_KEYS)
        forwarded = dataclasses.replace(operation, mount_from=None)
    _upstream_token(request, identity, forwarded)
    if decision.filter_catalog:
        visible = pipeline.pullable(snapshot, settings.admin_prefix, identity, view.address)
        return await catalog_response(request, operation, view, visible)
    if screened.expect_continue and request.version >= (1, 1):
        # Only now that the request is authorized may the client start sending its body.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    tag_guard = immutable.guard(snapshot.policy.immutable, forwarded) if snapshot.policy is not None else None
    if tag_guard is not None:
        return await _guarded(request, settings, view, target, screened, tag_guard)
    return await forward(request, settings, view, target, screened)


async def _guarded(
    request: web.BaseRequest,
    settings: Settings,
    view: forwarding.ClientView,
    target: str,
    screened: Admitted,
    guard: immutable.Guard,
) -> web.StreamResponse:
    """A manifest PUT or DELETE that could change an immutable tag: what the registry has is
    looked at first (gateway.tag_lookup), gateway.immutable decides, and only then does the
    registry get the request. A PUT to a covered tag, and a delete by digest, hold the
    repository's lock from the look to the registry's answer, in this process and, with Redis,
    across processes and replicas: two first pushes of a tag cannot both pass, nor a delete slip
    in beside a first push. The manifest is read whole before the lock is taken, so that a client
    sending slowly holds no one up."""
    gateway = request[GATEWAY]
    record = request[AUDIT_RECORD]
    pool = gateway.upstream
    if pool is None:  # only before start-up or after shutdown
        return error_response(503, "UNAVAILABLE", "the gateway is not running")
    looking = None  # what the looks send the registry: a pull token of the gateway's in bearer mode
    if gateway.authority is not None:
        pull = Scope("repository", guard.repository, frozenset({PULL}))
        looking = f"Bearer {gateway.authority.token_for('', [pull])}"
    rule = guard.rules[0]
    try:
        if guard.kind == "delete_tag":
            return _immutable_refusal(record, immutable.on_delete_tag(rule, guard.reference))
        if guard.kind == "tag_query":
            return _immutable_refusal(record, immutable.on_tag_query(rule))
        if guard.kind == "delete_blob":
            return _immutable_refusal(record, immutable.on_delete_blob(rule, guard.reference))
        if guard.kind == "delete_digest":
            async with (
                gateway.tag_locks.holding(guard.repository),
                gateway.shared_tag_locks.holding(guard.repository),
            ):
                pointing = await tag_lookup.tags_holding(
                    pool, view, looking, guard.repository, guard.reference, guard.rules
                )
                refusal = immutable.on_delete_digest(guard.reference, pointing)
                if refusal is not None:
                    return _immutable_refusal(record, refusal)
                return await forward(request, settings, view, target, screened)
        if screened.content_length is not None and screened.content_length > MAX_MANIFEST_BYTES:
            raise BodyFailed(400, "MANIFEST_INVALID", "manifest larger than 4 MiB")
        manifest = await _manifest_body(request, record, screened, settings.body_timeout)
        async with (
            gateway.tag_locks.holding(guard.repository),
            gateway.shared_tag_locks.holding(guard.repository),
        ):
            existing = await tag_lookup.digest_of(pool, view, looking, guard.repository, guard.reference)
            pushed = "sha256:" + hashlib.sha256(manifest).hexdigest()
            refusal = immutable.on_put(rule, guard.reference, existing, pushed)
            if refusal is not None:
                return _immutable_refusal(record, refusal)
            return await forward(request, settings, view, target, screened, manifest)
    except (tag_lookup.LookupFailed, TagBusy) as exc:
        record.decision = "error"
        log.warning("immutable tags: %s %s refused: %s", request.method, record.path, exc)
        return error_response(503, "UNAVAILABLE", f"cannot check immutable tags: {exc}")
    except BodyFailed as failure:
        record.decision = "error"
        return error_response(failure.status, failure.code, failure.message)


MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's own limit on a manifest PUT


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class KeyedLocks:
    """One asyncio lock per key while anyone holds or waits for it (no lock kept for every
    repository ever pushed to); waiting longer than WAIT_SECONDS is TagBusy."""

    def __init__(self) -> None:
        self._locks: dict[object, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def holding(self, key: object) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(WAIT_SECONDS):
                    await lock.acquire()
            except TimeoutError:
                raise TagBusy(
                    f"another change in {key} has been in flight for {WAIT_SECONDS:.0f} s"
                ) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


async def _manifest_body(
    request: web.BaseRequest, record: AuditRecord, screened: Admitted, idle_timeout: float
) -> bytes:
    """The manifest, whole: its digest decides before the registry gets a byte of it."""
    manifest = bytearray()
    async for chunk in RequestBody(request, record, screened.content_length, idle_timeout).chunks():
        manifest += chunk
        if len(manifest) > MAX_MANIFEST_BYTES:
            raise BodyFailed(400, "MANIFEST_INVALID", "manifest larger than 4 MiB")
    return bytes(manifest)


def _immutable_refusal(record: AuditRecord, refusal: immutable.Refusal) -> web.Response:
    record.decision = "deny"
    log.info("immutable tags: refused %s: %s", record.path, refusal.message)
    return error_response(403, "DENIED", refusal.message)


def _client_view(request: web.BaseRequest) -> forwarding.ClientView | None:
    """How the client reached us (None: no valid Host), kept on the request and in its audit record."""
    host = request.headers.get("Host", "")
    if not forwarding.valid_host(host):
        return None
    trusted = request[GATEWAY].settings.trusted_proxies
    view = forwarding.client_view(request.remote or "", request.scheme, host, request.headers, trusted)
    request[CLIENT_VIEW] = view
    request[AUDIT_RECORD].client = view.address
    return view


def _unreadable_client(view: forwarding.ClientView) -> web.Response:
    log.warning(
        "refused a request whose X-Forwarded-For names no address as its client: %r (from %s)",
        view.address[:100],
        view.forwarded_for[-1],
    )
    return error_response(400, "UNSUPPORTED", "X-Forwarded-For names no address for the client")


async def _token_request(request: web.BaseRequest, authority: TokenAuthority) -> web.StreamResponse:
    view = _client_view(request)
    if view is None:
        return error_response(400, "UNSUPPORTED", "missing or invalid Host header")
    if view.unreadable:
        return _unreadable_client(view)
    return await token_endpoint(
        request,
        request[GATEWAY].settings,
        authority,
        request[GATEWAY].authenticator,
        request[GATEWAY].lockout,
        request[GATEWAY].metrics,
        request[AUDIT_RECORD],
        view.address,
        request[GATEWAY].ask_ext_authz,
    )


async def catalog_response(
    request: web.BaseRequest,
    operation: Operation,
    view: forwarding.ClientView,
    visible: Callable[[str], bool],
) -> web.StreamResponse:
    settings = request[GATEWAY].settings
    try:
        n, last = catalog.parse_paging(operation.params)
        # The catalog's own body-less GETs carry none of the client's headers, framing least of all.
        headers = CIMultiDict(forwarding.forwarding_headers(view))
        upstream_authorization = request.get(UPSTREAM_AUTHORIZATION)
        if upstream_authorization:
            headers["Authorization"] = upstream_authorization
        session = request[GATEWAY].session
        if session is None:  # only before start-up or after shutdown
            return error_response(503, "UNAVAILABLE", "the gateway is not running")
        page = await catalog.filtered_page(session, settings.upstream, headers, visible, n, last)
    except catalog.CatalogError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.warning("upstream failed during catalog: %s", exc)
        return error_response(502, "UNAVAILABLE", "the registry is unreachable")
    response = web.json_response({"repositories": page.repositories})
    response.headers[API_VERSION_HEADER] = API_VERSION
    if page.next_last is not None:
        link = f"/v2/_catalog?last={quote(page.next_last, safe='')}"
        if n is not None:
            link += f"&n={n}"
        response.headers["Link"] = f'<{link}>; rel="next"'
    return response


async def forward(
    request: web.BaseRequest,
    settings: Settings,
    view: forwarding.ClientView,
    target: str,
    screened: Admitted,
    read_already: bytes | None = None,
) -> web.StreamResponse:
    """`read_already`: the whole body, read before (a manifest whose digest decided)."""
    gateway = request[GATEWAY]
    upstream_pool = gateway.upstream
    if upstream_pool is None:  # only before start-up or after shutdown
        return error_response(503, "UNAVAILABLE", "the gateway is not running")
    head_only = request.method == "HEAD"
    authorization = request.get(UPSTREAM_AUTHORIZATION) or None
    # Framing we forward is framing we set: the length we will send, or chunked, never the
    # client's header as it was.
    length = screened.content_length if read_already is None else len(read_already)
    chunked = screened.has_body and length is None
    head = forwarding.upstream_request_head(
        request.method,
        target,
        request.raw_headers,
        view,
        authorization,
        length,
        chunked,
    )
    record = request[AUDIT_RECORD]
    body: AsyncIterator[bytes] | None = None
    if read_already is not None:
        body = _once(read_already)
    elif screened.has_body:
        body = RequestBody(request, record, screened.content_length, settings.body_timeout).chunks()

    started = time.monotonic()
    try:
        upstream = await upstream_pool.request(request.method, head, body, chunked)
    except BodyFailed as failure:
        record.decision = "error"
        log.info("request body refused: %s %s: %s", request.method, request.path, failure.message)
        return error_response(failure.status, failure.code, failure.message)
    except ConnectionError:
        record.decision = "error"
        raise ConnectionResetError("client went away during the upload") from None
    except UpstreamError as exc:
        record.decision = "error"
        if (request.transport is None or request.transport.is_closing()) and not isinstance(
            exc, NoConnection | UpstreamTimeout
        ):
            raise ConnectionResetError("client went away during the upload") from exc
        return answers.upstream_failed(exc, request.method, record.path, settings.connect_timeout)
    gateway.metrics.observe_upstream(record.operation or "other", time.monotonic() - started)

    async with upstream:
        record.digest = upstream.header(b"docker-content-digest")
        if answers.needs_own_error_body(upstream.status, upstream.header(b"content-type") or ""):
            operation = screened.operation
            original = b""
            if request.method != "HEAD":
                with contextlib.suppress(UpstreamError):
                    original = await upstream.read_at_most(answers.UPSTREAM_ERROR_LOG_BYTES)
            # The probe below needs a registry connection of its own: this one goes back first,
            # so that a full pool does not make the probe wait for itself.
            upstream.release()
            if (
                upstream.status == 500
                and isinstance(operation, Operation)
                and await answers.is_plain_blob(upstream_pool, view, authorization, operation)
            ):
                # distribution 2.8 answers 500 when a manifest is asked for by the digest of a
                # layer or config blob (it fails to parse it); the truth is "no such manifest".
                return error_response(404, "MANIFEST_UNKNOWN", "manifest unknown: the digest names a blob")
            return answers.replace_error(request.method, request.path, upstream, original)
        headers = forwarding.downstream_response_headers(upstream.raw_headers)
        if API_VERSION_HEADER not in headers:
            headers[API_VERSION_HEADER] = API_VERSION
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        gateway.finish_headers(request, response)
        await response.prepare(request)
        if head_only:
            await response.write_eof()
            return response

        def abort() -> None:
            if request.transport is not None:
                request.transport.abort()

        try:
            await relay(
                upstream, response.write, abort, record, settings.body_timeout, request.method, record.path
            )
        except ClientTooSlow:
            raise ConnectionResetError("client too slow") from None
        except RegistryCut as exc:
            raise UpstreamAborted("upstream failed mid-response") from exc
        await response.write_eof()
        return response


class Gateway:
    """One process's request path: the users and rules, the registry's connections, the counters.

    `serve` is the whole of it, for every request: timed, counted and written to the audit log; any
    unexpected failure a logged 500 in registry format, never a bare traceback page. The server
    calls it directly (gateway.http.server), without aiohttp's router, middleware and signals, which
    cost as much per request as all of our own decisions.
    """

    def __init__(
        self,
        settings: Settings,
        store: AccessStore | None,
        audit: AuditLog | None,
        lockout: Lockout | None = None,
    ) -> None:
        self.settings = settings
        cache = CredentialCache(settings.cache_size, settings.cache_ttl)
        access = store or AccessStore(settings.htpasswd, settings.policy, robots_path=settings.robots)
        self.authenticator = Authenticator(access, cache, robots_last_used=settings.robots_last_used)
        self.metrics = Metrics(cache, access)
        self.metrics.directory_state = self._directory_problem
        # Made now, not at the first login, so that their warnings (a directory's unverified
        # certificate) are in the start-up log.
        self.authenticator.sources(access.snapshot)
        self.audit = audit or AuditLog(settings.audit_log)
        if self.audit.target is not None:
            self.metrics.audit_records_lost = lambda: self.audit.lost
        local = Lockout(settings.lockout_attempts, settings.lockout_window) if lockout is None else lockout
        # What every replica must agree on, in Redis when there is one (docs/replicas.md).
        self.link = (
            RedisLink(settings.redis_url, settings.redis_password_file, settings.redis_ca_file)
            if settings.redis_url is not None
            else None
        )
        self.lockout = SharedLockout(local, self.link)
        self.shared_tag_locks = SharedTagLocks(self.link)  # immutable tags, across processes
        self.metrics.shared_state = self.link
        self.authority = TokenAuthority(settings) if settings.challenge == "bearer" else None
        if self.link is not None and self.authority is not None:
            SharedRevocations(self.link, self.authority.set_shared_revocations)
        self.upstream: UpstreamPool | None = None
        self._authorizer: ExternalAuthorizer | None = None
        self.session: aiohttp.ClientSession | None = None  # the catalog's pages, readiness probes
        self.tag_locks = KeyedLocks()  # immutable tags: one PUT to a tag at a time (app._guarded)
        self._pages: Pages | None = None  # the web page (ui), made at its first request
        self.hsts = (
            f"max-age={settings.hsts_max_age}" if settings.tls_cert and settings.hsts_max_age else None
        )

    def external_authorizer(self, settings: ExternalSettings) -> ExternalAuthorizer:
        """The ext_authz program's cached answers, kept while its settings stay."""
        if self._authorizer is None or self._authorizer.settings != settings:
            self._authorizer = ExternalAuthorizer(settings, self.settings.cache_ttl)
        return self._authorizer

    async def ask_ext_authz(self, asked: acl.Request) -> bool | None:
        """The current rules' ext_authz program on one request (False when there is none)."""
        policy = self.authenticator.store.snapshot.policy
        if policy is None or policy.ext_authz is None:
            return False
        return await self.external_authorizer(policy.ext_authz).authorize(asked)

    def _directory_problem(self) -> str | None:
        directory = self.authenticator.probing_source()
        return None if directory is None else directory.last_problem

    async def directory_status(self) -> str | None:
        """For /readyz: None without a source that can tell (a directory), else "ok" or what is
        wrong with it."""
        directory = self.authenticator.probing_source()
        if directory is None:
            return None
        problem = await directory.probe()
        return "ok" if problem is None else f"unreachable: {problem}"

    def pages(self) -> Pages:
        """The web page's handler, imported and made at its first request (Jinja2 and the
        templates cost nothing to a gateway that serves no page)."""
        if self._pages is None:
            from gateway.ui.pages import Pages

            self._pages = Pages(self)
        return self._pages

    def status(self) -> dict[str, object]:
        """What runs, for the metrics listener's /status (it adds the registry and the
        directory): each followed file with the hash of what was loaded from it and when, the
        counts, the token key ids. No secret: no password hash, no key, no token."""
        store = self.authenticator.store
        snapshot = store.snapshot
        policy = snapshot.policy
        loaded = _iso_time(store.loaded_at)
        files: list[dict[str, object]] = [
            {"setting": key, "path": str(path), "sha256": digest, "loaded_at": loaded}
            for key, (path, digest) in store.loaded_files.items()
        ]
        configuration: dict[str, object] = {"state": "current", "loaded_at": loaded}
        if store.stale_since is not None:
            configuration = {
                "state": "stale",
                "loaded_at": loaded,
                "stale_since": _iso_time(store.stale_since),
                "problem": store.stale_problem,
            }
        static = len(policy.users) if policy is not None else 0
        counts = {
            "users": len(snapshot.users) - static,
            "static_users": static,
            "rules": len(policy.acl) if policy is not None else 0,
            "immutable_tag_rules": len(policy.immutable) if policy is not None else 0,
            "robots": len(snapshot.robots),
        }
        answer: dict[str, object] = {
            "version": __version__,
            "configuration": configuration,
            "files": files,
            "counts": counts,
            "policy": "file"
            if policy is not None
            else f"default (admin_prefix {self.settings.admin_prefix!r})",
            "reloads": {"succeeded": store.reloads_ok, "refused": store.reloads_failed},
        }
        if self.authority is not None:
            answer["token_keys"] = {
                "file": None if self.settings.token_key is None else str(self.settings.token_key),
                "key_ids": self.authority.key_ids(),
            }
        return answer

    async def serve(self, request: web.BaseRequest) -> web.StreamResponse:
        record = new_record(request.remote or "", request.method, request.raw_path)
        request[GATEWAY] = self
        request[AUDIT_RECORD] = record
        metrics = self.metrics
        metrics.in_flight += 1
        started = time.monotonic()
        response: web.StreamResponse | None = None
        try:
            try:
                response = await handle(request)
            except (ConnectionError, asyncio.CancelledError):
                record.decision = "error" if record.decision == "allow" else record.decision
                raise
            except web.HTTPException as exc:
                response = error_response(exc.status, "UNSUPPORTED", exc.reason)
            except Exception:
                log.exception("internal error handling %s %s", request.method, record.path)
                record.decision = "error"
                response = error_response(500, "UNKNOWN", "internal gateway error")
            if not response.prepared:
                self.finish_headers(request, response)
            return response
        finally:
            if response is not None:
                record.status = response.status
                body = response.body if isinstance(response, web.Response) else None
                if isinstance(body, bytes | bytearray) and not record.bytes_out and request.method != "HEAD":
                    record.bytes_out = len(body)
            self.finish_record(record, started)

    def allowed_outright(self, head: ParsedHead, remote: str, scheme: str, memo: Any) -> Forward | None:
        """The fast path's question: may this head be forwarded at once (gateway.admission)?"""
        return admission.allowed_outright(self, head, remote, scheme, memo)

    def new_memo(self) -> IdentityMemo:
        """What the fast path keeps per connection for admission: the identity last proved."""
        return IdentityMemo()

    def own_headers(self, closing: bool = False) -> list[tuple[str, str]]:
        """The gateway's own header lines on every answer, on either transport: no software
        versions for fingerprinting, HSTS when serving TLS and asked to, and `Connection: close`
        when the connection ends with this answer."""
        headers = [("Server", SERVER_NAME)]
        if self.hsts is not None:
            headers.append(("Strict-Transport-Security", self.hsts))
        if closing:
            headers.append(("Connection", "close"))
        return headers

    def finish_record(self, record: AuditRecord, started: float) -> None:
        """A request is over, on either transport: timed, counted, and written to the audit log."""
        metrics = self.metrics
        metrics.in_flight -= 1
        record.duration_ms = (time.monotonic() - started) * 1000  # rounded when written
        metrics.count_request(record.operation or "invalid", record.status, record.decision)
        if record.bytes_in:
            metrics.bytes_in.inc(record.bytes_in)
        if record.bytes_out:
            metrics.bytes_out.inc(record.bytes_out)
        self.audit.write(record)

    def finish_headers(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """No software versions for fingerprinting; HSTS when serving TLS and asked to; and the
        connection closed after any answer that leaves a request body unread (the client may be
        waiting to send it, after `Expect: 100-continue`, or still sending it) or that follows an
        upgrade request."""
        for name, value in self.own_headers():
            response.headers[name] = value
        unread_body = request.body_exists and (
            not request.content.is_eof() or request.content.exception() is not None
        )
        if request.get(CLOSE_AFTER) or unread_body:
            response.force_close()
            response.headers["Connection"] = "close"

    async def start(self) -> None:
        settings = self.settings
        self.upstream = UpstreamPool(
            settings.upstream, settings.upstream_connections, settings.connect_timeout, settings.read_timeout
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.connect_timeout,
            sock_connect=settings.connect_timeout,
            sock_read=settings.read_timeout,
        )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=8, keepalive_timeout=30),
            timeout=timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        if self.link is not None:
            self.link.start()

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.stop()
        if self.upstream is not None:
            await self.upstream.close()
        if self.session is not None:
            await self.session.close()
        self.authenticator.close()


GATEWAY_KEY = web.AppKey("gateway", Gateway)
GATEWAY = web.RequestKey("gateway", Gateway)


async def _reload_users(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY_KEY]
    settings = gateway.settings
    authenticator = gateway.authenticator

    async def watch() -> None:
        while True:
            await asyncio.sleep(settings.reload_interval)
            authority = gateway.authority
            if authority is not None:
                try:
                    authority.reload_if_changed()
                except Exception:  # the watcher must outlive any one file's problem
                    log.exception("reload of the token key or revocations failed; keeping the last good ones")
            try:
                await authenticator.reload_if_changed()
            except Exception:
                log.exception("reload of the users and rules failed; keeping the last good ones")

    task = asyncio.create_task(watch())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _upstream_connections(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY_KEY]
    await gateway.start()
    assert gateway.session is not None
    app[SESSION_KEY] = gateway.session
    yield
    await gateway.stop()


async def _no_early_continue(_request: web.Request) -> None:
    return None


def create_app(
    settings: Settings,
    store: AccessStore | None = None,
    audit: AuditLog | None = None,
    lockout: Lockout | None = None,
) -> web.Application:
    """The gateway as an aiohttp application: its start-up and shutdown, and one route to
    `Gateway.serve` (gateway.http.server's runner calls `serve` directly, without the router)."""
    app = web.Application(
        handler_args={
            "max_line_size": settings.max_header_size,
            "max_field_size": settings.max_header_size,
            # Request bodies cross as the bytes the client sent: the registry never decodes them.
            "auto_decompress": False,
            "keepalive_timeout": settings.keepalive_timeout,
        },
    )
    gateway = Gateway(settings, store, audit, lockout)
    app[GATEWAY_KEY] = gateway
    app[APPLICATION_KEY] = gateway  # what the transports see of it (gateway.http.fastpath.Application)
    app[SETTINGS_KEY] = settings
    app[AUTHENTICATOR_KEY] = gateway.authenticator
    app[METRICS_KEY] = gateway.metrics
    app[AUDIT_KEY] = gateway.audit
    app[LOCKOUT_KEY] = gateway.lockout
    if gateway.authority is not None:
        app[AUTHORITY_KEY] = gateway.authority
    app.cleanup_ctx.append(_upstream_connections)
    app.cleanup_ctx.append(_reload_users)
    # `Expect: 100-continue` is answered in `handle`, after authorization, not by the router.
    app.router.add_route("*", "/{tail:.*}", gateway.serve, expect_handler=_no_early_continue)
    return app


def _iso_time(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
