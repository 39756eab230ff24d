"""The request path: parse → authenticate → authorize → stream to the registry and back.

Three outcomes for every request: allowed (forwarded), denied (401/403 in the registry's error
format), or an error (502/504 for upstream failures, 500 for our own bugs, always logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from yarl import URL

from gateway import forwarding
from gateway.authn import (
    Authenticator,
    CredentialCache,
    Credentials,
    Malformed,
    UserFile,
    parse_basic_authorization,
)
from gateway.config import Settings
from gateway.errors import API_VERSION, API_VERSION_HEADER, error_response
from gateway.policy import Outcome, default_policy
from gateway.routes import Operation, RouteError, parse_request

log = logging.getLogger(__name__)

# The nginx recipe's filter for docker clients older than 1.6, which speak only the v1 protocol.
OLD_DOCKER_CLIENT = re.compile(r"^(docker/1\.(3|4|5(?!\.[0-9]-dev))|Go ).*$")
CHUNK_SIZE = 256 * 1024

SETTINGS_KEY = web.AppKey("settings", Settings)
AUTHENTICATOR_KEY = web.AppKey("authenticator", Authenticator)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


class UpstreamAborted(ConnectionResetError):
    """The registry failed after the response started: the client connection is cut, not completed."""


def _challenge_headers(settings: Settings) -> dict[str, str]:
    return {"WWW-Authenticate": f'Basic realm="{settings.realm}"'}


def _detail(operation: Operation) -> list[dict[str, str]] | None:
    if operation.repository is None:
        return None
    return [
        {"Type": "repository", "Name": operation.repository, "Action": action}
        for action in sorted(operation.actions)
    ]


async def _request_body(request: web.Request) -> AsyncIterator[bytes]:
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return
        yield chunk


async def handle(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS_KEY]
    head = request.method == "HEAD"

    if settings.block_old_clients and OLD_DOCKER_CLIENT.match(request.headers.get("User-Agent", "")):
        return error_response(404, "UNSUPPORTED", "this docker client is too old", head=head)

    parsed = parse_request(request.method, request.raw_path)
    if isinstance(parsed, RouteError):
        return error_response(parsed.status, parsed.code, parsed.message, head=head)
    operation = parsed

    host = request.headers.get("Host", "")
    if not forwarding.valid_host(host):
        return error_response(400, "UNSUPPORTED", "missing or invalid Host header", head=head)

    user: str | None = None
    credentials = parse_basic_authorization(request.headers.get("Authorization"))
    if isinstance(credentials, Malformed):
        log.info("rejected authorization header from %s: %s", request.remote, credentials.reason)
        return error_response(
            401,
            "UNAUTHORIZED",
            "authentication required",
            _detail(operation),
            _challenge_headers(settings),
            head=head,
        )
    if isinstance(credentials, Credentials):
        user = await request.app[AUTHENTICATOR_KEY].authenticate(credentials)
        if user is None:
            log.info("failed login for user %r from %s", credentials.username, request.remote)
            return error_response(
                401,
                "UNAUTHORIZED",
                "authentication required",
                _detail(operation),
                _challenge_headers(settings),
                head=head,
            )

    decision = default_policy(user, operation, settings.admin_prefix)
    if decision.outcome is Outcome.CHALLENGE:
        return error_response(
            401,
            "UNAUTHORIZED",
            "authentication required",
            _detail(operation),
            _challenge_headers(settings),
            head=head,
        )
    if decision.outcome is Outcome.DENY:
        log.info("denied %s %s to %r: %s", request.method, operation.route.value, user, decision.reason)
        return error_response(
            403, "DENIED", "requested access to the resource is denied", _detail(operation), head=head
        )
    return await forward(request, settings)


async def forward(request: web.Request, settings: Settings) -> web.StreamResponse:
    session = request.app[SESSION_KEY]
    head = request.method == "HEAD"
    view = forwarding.client_view(
        request.remote or "",
        request.scheme,
        request.headers["Host"],
        request.headers,
        settings.trusted_proxies,
    )
    headers = forwarding.upstream_request_headers(request.headers, view)
    # encoded=True: forward the exact bytes we authorized; yarl would otherwise normalise them.
    url = URL(str(settings.upstream) + request.raw_path, encoded=True)
    body = _request_body(request) if request.body_exists else None

    try:
        upstream = await session.request(
            request.method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            auto_decompress=False,
        )
    except (TimeoutError, aiohttp.ServerTimeoutError):
        log.warning("upstream timed out: %s %s", request.method, request.path)
        return error_response(504, "UNAVAILABLE", "the registry did not answer in time", head=head)
    except aiohttp.ClientError as exc:
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError("client went away during the upload") from exc
        log.warning("upstream failed: %s %s: %s", request.method, request.path, exc)
        return error_response(502, "UNAVAILABLE", "the registry is unreachable", head=head)

    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(forwarding.downstream_response_headers(upstream.headers))
        if API_VERSION_HEADER not in response.headers:
            response.headers[API_VERSION_HEADER] = API_VERSION
        await response.prepare(request)
        if head:
            await response.write_eof()
            return response
        try:
            while True:
                chunk = await upstream.content.readany()
                if not chunk:
                    break
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Too late for an error status: cut the connection so the client sees a failed transfer,
            # never a short body that looks complete.
            log.warning("upstream failed mid-response: %s %s: %s", request.method, request.path, exc)
            if request.transport is not None:
                request.transport.abort()
            raise UpstreamAborted("upstream failed mid-response") from exc
        await response.write_eof()
        return response


@web.middleware
async def api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Anything unexpected becomes a logged 500 in registry format, never a bare traceback page."""
    try:
        return await handler(request)
    except (ConnectionError, asyncio.CancelledError):
        raise
    except web.HTTPException as exc:
        return error_response(exc.status, "UNSUPPORTED", exc.reason, head=request.method == "HEAD")
    except Exception:
        log.exception("internal error handling %s %s", request.method, request.path)
        return error_response(500, "UNKNOWN", "internal gateway error", head=request.method == "HEAD")


async def _reload_users(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    authenticator = app[AUTHENTICATOR_KEY]

    async def watch() -> None:
        while True:
            await asyncio.sleep(settings.reload_interval)
            try:
                await asyncio.to_thread(authenticator.reload_if_changed)
            except Exception:
                log.exception("htpasswd reload failed; keeping the last good users")

    task = asyncio.create_task(watch())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_connections, limit_per_host=0, keepalive_timeout=60
    )
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        read_bufsize=CHUNK_SIZE,
    )
    app[SESSION_KEY] = session
    yield
    await session.close()
    app[AUTHENTICATOR_KEY].close()


def create_app(settings: Settings, user_file: UserFile | None = None) -> web.Application:
    app = web.Application(
        middlewares=[api_errors],
        handler_args={
            "max_line_size": settings.max_header_size,
            "max_field_size": settings.max_header_size,
        },
    )
    app[SETTINGS_KEY] = settings
    app[AUTHENTICATOR_KEY] = Authenticator(
        user_file or UserFile(settings.htpasswd),
        CredentialCache(settings.cache_size, settings.cache_ttl),
    )
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_reload_users)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
