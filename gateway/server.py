"""The HTTP server around the app: aiohttp's, with requests it cannot parse answered in registry format.

aiohttp answers unparsable requests (oversized headers, bad request lines) itself, in plain text,
and logs a traceback for each. On the internet edge that is noise an attacker controls, and the
answer lacks the Api-Version header clients look for; so we answer those in the registry's error
format and log one line.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import error_response

log = logging.getLogger("gateway.server")


class _RegistryErrorRequestHandler(RequestHandler):
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
    def __call__(self) -> RequestHandler:
        return _RegistryErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application; only the handler class differs.
        server.__class__ = _Server
        return server
