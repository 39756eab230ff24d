"""What the client gets when the registry's answer cannot pass as it is, on either transport:
a failure to reach or hear from the registry (502/504), an error body of the gateway's own in
place of the registry's (5xx bodies name storage paths and drivers; Go's plain-text 404), and
distribution 2.8's 500 for a manifest asked for by a blob's digest (404 MANIFEST_UNKNOWN).
"""

from __future__ import annotations

import logging

from aiohttp import web

from gateway import forwarding
from gateway.errors import error_response
from gateway.http.upstream import NoConnection, UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout
from gateway.routes import Operation, Route

log = logging.getLogger("gateway.app")

# How much of a registry error body is read to log it before answering with the gateway's own.
UPSTREAM_ERROR_LOG_BYTES = 4096


def upstream_failed(exc: UpstreamError, method: str, path: str, connect_timeout: float) -> web.Response:
    """The answer to a request the registry could not be asked, or did not answer (logged)."""
    if isinstance(exc, NoConnection):
        log.warning("no connection to the registry within %gs: %s %s", connect_timeout, method, path)
        message = (
            "no connection to the registry in time: it is unreachable, or every connection to it is busy"
        )
        return error_response(504, "UNAVAILABLE", message)
    if isinstance(exc, UpstreamTimeout):
        log.warning("upstream timed out: %s %s", method, path)
        return error_response(504, "UNAVAILABLE", "the registry did not answer in time")
    log.warning("upstream failed: %s %s: %s", method, path, exc)
    return error_response(502, "UNAVAILABLE", "the registry is unreachable")


async def is_plain_blob(
    pool: UpstreamPool, view: forwarding.ClientView, authorization: str | None, operation: Operation
) -> bool:
    """Whether a manifest reference by digest names a blob of the repository (a layer or config):
    the registry links those, never manifests, under blobs/."""
    if operation.route is not Route.MANIFEST or operation.method not in ("GET", "HEAD"):
        return False
    if operation.reference is None or ":" not in operation.reference:
        return False
    target = f"/v2/{operation.repository}/blobs/{operation.reference}"
    head = forwarding.upstream_request_head("HEAD", target, (), view, authorization)
    try:
        async with await pool.request("HEAD", head) as probe:
            return probe.status == 200
    except UpstreamError:
        return False


def needs_own_error_body(status: int, content_type: str) -> bool:
    """Registry answers a client must not see as they are: 5xx bodies (they carry storage paths and
    driver names) and errors that are not in the JSON error format (Go's `404 page not found`)."""
    if status >= 500:
        return True
    return status >= 400 and content_type.split(";", 1)[0].strip().lower() != "application/json"


def replace_error(method: str, path: str, upstream: UpstreamResponse, original: bytes) -> web.Response:
    """The registry's status, with an error body of our own; the original (its first bytes) goes
    to the log."""
    if upstream.status >= 500:
        log.warning(
            "registry answered %d to %s %s: %s",
            upstream.status,
            method,
            path,
            original.decode("utf-8", "replace"),
        )
        retry = upstream.header(b"retry-after")
        return error_response(
            upstream.status,
            "UNKNOWN",
            "the registry failed to handle the request",
            headers={"Retry-After": retry} if retry else None,
        )
    kept = {
        name: value
        for name, value in forwarding.downstream_response_headers(upstream.raw_headers).items()
        if name.lower() not in forwarding.CONTENT_HEADERS
    }
    if upstream.status == 404:
        return error_response(404, "NOT_FOUND", "the registry does not serve this endpoint", headers=kept)
    return error_response(
        upstream.status, "UNSUPPORTED", f"the registry answered {upstream.status}", headers=kept
    )
