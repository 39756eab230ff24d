"""The HTTP server around the app: aiohttp's, with requests it cannot parse answered in registry format.

aiohttp answers unparsable requests (oversized headers, bad request lines) itself, in plain text,
and logs a traceback for each. On the internet edge that is noise an attacker controls, and the
answer lacks the Api-Version header clients look for; so we answer those in the registry's error
format and log one line.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import error_response

log = logging.getLogger("gateway.server")


@dataclass
class ConnectionLimits:
    """Shared by every connection of one server: how many may be open, how long a request head may take."""

    max_connections: int  # 0: no limit
    header_timeout: float  # 0: no limit
    open: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def opened(self) -> None:
        self.open += 1
        self.idle.clear()

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0:
            self.idle.set()


class _RegistryErrorRequestHandler(RequestHandler):
    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_deadline: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self._limits
        if limits.max_connections and limits.open >= limits.max_connections:
            log.warning("connection refused: %d connections open (max_connections)", limits.open)
            transport.close()
            return
        limits.opened()
        self._counted = True
        super().connection_made(transport)
        if limits.header_timeout:
            # Slowloris: a client that trickles its request head holds a connection forever;
            # the first request must arrive whole in time (later ones: aiohttp's keep-alive timeout).
            self._head_deadline = asyncio.get_running_loop().call_later(
                limits.header_timeout, self._head_timed_out, transport
            )

    def _head_timed_out(self, transport: asyncio.BaseTransport) -> None:
        log.info("closed a connection that sent no complete request in %ss", self._limits.header_timeout)
        transport.close()

    def request_head_received(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:
            return  # refused in connection_made: aiohttp never saw this connection
        self._limits.closed()
        self._counted = False
        self.request_head_received()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            # A transfer cut on purpose (the registry failed mid-response) or a client gone:
            # the request path has logged it already.
            log.debug("connection closed during a response to %s: %s", request.remote, exc)
        elif isinstance(exc, BadHttpMethod):
            # Mostly TLS handshakes on the plain port: skopeo and podman try HTTPS first.
            log.debug("refused non-HTTP request from %s", request.remote)
        elif isinstance(exc, HttpProcessingError) and status < 500:
            log.info("refused malformed request from %s: %s", request.remote, type(exc).__name__)
        else:
            log.error("error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        code = "UNSUPPORTED" if status < 500 else "UNKNOWN"
        text = "malformed request" if status < 500 else "internal gateway error"
        response = error_response(status, code, text)
        response.force_close()
        return response


class _Server(web.Server):
    limits: ConnectionLimits

    def __call__(self) -> RequestHandler:
        return _RegistryErrorRequestHandler(self, limits=self.limits, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application; only the handler class differs.
        server.__class__ = _Server
        cast(_Server, server).limits = self.limits
        return server


def request_head_received(protocol: object) -> None:
    """Called once a request reached the app: its head arrived in time."""
    if isinstance(protocol, _RegistryErrorRequestHandler):
        protocol.request_head_received()
