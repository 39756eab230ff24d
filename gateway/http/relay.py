"""The one response writer both transports use for a registry answer's body: every byte as it
comes, never buffered beyond a chunk, each chunk taken by the client within `body_timeout`, and
a failure on either side cutting the client's connection (never a short body that looks whole).

A transport gives it `send`, which writes a chunk its own way (the fast path straight to its
asyncio transport, the full path through aiohttp's response) and returns what to wait for before
the next one, if anything, and `abort`, which cuts the client's connection. What went wrong is
raised for the transport to end the exchange its own way, once recorded and logged here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.audit import AuditRecord
from gateway.http.upstream import UpstreamError, UpstreamResponse

log = logging.getLogger("gateway.app")

Send = Callable[[bytes | memoryview], Awaitable[object] | None]


class Cut(Exception):
    """The transfer was cut, recorded and logged: the client's connection is aborted."""


class ClientTooSlow(Cut):
    """The client took no piece of the answer for `body_timeout` seconds."""


class RegistryCut(Cut):
    """The registry failed mid-answer: too late for an error status."""


class ClientGone(Exception):
    """Raised by a transport's `send` when the client's connection is closed already."""


async def relay(
    upstream: UpstreamResponse,
    send: Send,
    abort: Callable[[], None],
    record: AuditRecord,
    body_timeout: float,
    method: str,
    path: str,
) -> None:
    """The rest of the registry's answer to the client. Counts `record.bytes_out`; raises
    ClientTooSlow or RegistryCut (recorded as errors, logged, the connection aborted), or the
    transport's own ClientGone."""
    try:
        while True:
            chunk = await upstream.read_chunk()
            if not chunk:
                return
            record.bytes_out += len(chunk)
            waiting = send(chunk)
            if waiting is None:
                continue
            # A client that stops reading would hold a registry connection for as long as it
            # likes: each chunk must be taken within body_timeout (a minimum rate of about a
            # chunk per body_timeout, which any live link exceeds).
            try:
                async with asyncio.timeout(body_timeout):
                    await waiting
            except TimeoutError:
                record.decision = "error"
                log.info("client took no response bytes for %gs: cut off", body_timeout)
                abort()
                raise ClientTooSlow from None
    except UpstreamError as exc:
        record.decision = "error"
        log.warning("upstream failed mid-response: %s %s: %s", method, path, exc)
        abort()
        raise RegistryCut from exc
