"""The HTTP server around every listener (listen, metrics_listen, redirect_listen): aiohttp's, with
requests it cannot parse answered in registry format. `listener_runner` builds each of them, so
every one has the same limits, error handling and headers.

aiohttp answers unparsable requests (oversized headers, bad request lines) itself, in plain text,
and logs a traceback for each. On the internet edge that is noise an attacker controls, and the
answer lacks the Api-Version header clients look for; so we answer those in the registry's error
format and log one line.

Every request head, not only a connection's first, must arrive whole within `header_timeout` of its
first byte and within `max_head_size` bytes: a client that trickles the head of its second request
otherwise holds a connection (and up to 128 x `max_header_size` bytes of buffered header lines) for
as long as it likes. Idle keep-alive connections are closed after `keepalive_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import (
    TYPE_CHECKING,
    Any,
    cast,
)

from aiohttp import web

from gateway.errors import API_VERSION, API_VERSION_HEADER, SERVER_NAME, error_body, error_response
from gateway.http.aiohttp_internals import (
    ERROR,
    BadHttpMethod,
    BaseRequest,
    EmptyStreamReader,
    ErrInfo,
    HttpProcessingError,
    HttpVersion11,
    RawRequestMessage,
    RequestHandler,
    StreamReader,
)
from gateway.http.fastpath import Application, FastPathConnection, Sections
from gateway.http.limits import ConnectionLimits

if TYPE_CHECKING:
    from gateway.config import Settings

log = logging.getLogger("gateway.server")

# The application an app serves, when it is the gateway's own (set by gateway.app.create_app).
APPLICATION_KEY = web.AppKey("application", Application)


class MalformedBody(HttpProcessingError):
    """A request body whose framing could not be parsed."""


def _head_too_large_response() -> bytes:
    body = error_body("UNSUPPORTED", "request head too large")
    head = (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"{API_VERSION_HEADER}: {API_VERSION}\r\n"
        f"Server: {SERVER_NAME}\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_WAITER_SLOT: Any = RequestHandler.__dict__["_waiter"]


class _RegistryErrorRequestHandler(RequestHandler):
    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        # With the fast path: where the connection goes back to between requests (set first:
        # aiohttp's __init__ already sets `_waiter`), and the first bytes of the next request
        # that came before the last one was finished.
        self._hand_back: Callable[[asyncio.Transport, bytes, float], None] | None = None
        self._stash = b""
        self._stash_started = 0.0
        self._clean_handover = False  # adopted with exactly one whole body-less request
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        # The body of the last request whose head was parsed: while it is unfinished, bytes that
        # arrive are body; once it is finished (or there is none), they begin the next head.
        self._last_payload: StreamReader | None = None
        self._counted = False
        self._draining = False  # the server is shutting down: finish the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._limits.admit(transport):
            return
        self._counted = True
        super().connection_made(transport)
        # The first head is due from the moment the connection opens (slowloris).
        self._arm_head_deadline()

    def _between_requests(self) -> bool:
        """Idle between two requests: the last one answered and its body read, nothing of the
        next one parsed, the request loop waiting for it, the connection not closing."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and self._done_with_requests()

    def _done_with_requests(self) -> bool:
        """This handler was given one whole body-less request and nothing else (so aiohttp's
        parser holds no byte of a next one), it is being or has been answered, and the
        connection is neither closing nor paused for writing. After a request with a body, the
        parser may hold the start of the next head where we cannot see it: such connections stay
        on the full path."""
        return (
            self._clean_handover
            and self._request_count == 1
            and isinstance(self._last_payload, EmptyStreamReader)
            and not self._paused
            and not self._messages
            and self._head_bytes == 0
            and (self._last_payload is None or self._last_payload.is_eof())
            and self._payload_parser is None
            and not self._upgraded
            and not (self._close or self._force_close or self._draining or self._buffer_paused)
            and self.transport is not None
        )

    def _give_back(self, data: bytes, hand_back: Callable[[asyncio.Transport, bytes, float], None]) -> None:
        """The next request begins: the connection goes back to the fast path with its first bytes
        (a first login or a challenge must not keep a connection off the fast path for good)."""
        transport = cast(asyncio.Transport, self.transport)
        self._head_done()
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self._counted = False  # the fast path counts the connection from now on
        # The request loop waits for a message that will not come: it ends, and so that it does
        # not close the transport on its way out, this handler lets go of it first.
        self._force_close = True
        self.transport = None
        if self._waiter is not None:
            self._waiter.cancel()
        if self._manager is not None:
            self._manager.connection_lost(self, None)
        # The head under way is due from its first byte.
        started = self._stash_started if data else asyncio.get_running_loop().time()
        hand_back(transport, data, started)

    def adopt(
        self, transport: asyncio.Transport, data: bytes, head_deadline: float | None, write_paused: bool
    ) -> None:
        """Take over a connection from the fast path (gateway.http.fastpath), with the bytes it read and
        did not answer; the connection is already counted, and the head under way keeps the
        deadline it had (loop time; None: no header_timeout)."""
        self._counted = True
        transport.set_protocol(self)
        super().connection_made(transport)
        if write_paused:
            # The transport will not call pause_writing again before resume_writing.
            self._paused = True
        if head_deadline is not None:
            self._head_deadline = asyncio.get_running_loop().call_at(head_deadline, self._head_timed_out)
        if data:
            self.data_received(data)
        self._clean_handover = (
            self._request_count == 1
            and self._head_bytes == 0
            and isinstance(self._last_payload, EmptyStreamReader)
            and data.endswith(b"\r\n\r\n")
            and data.count(b"\r\n\r\n") == 1
        )

    def _arm_head_deadline(self) -> None:
        if self._limits.header_timeout and self._head_deadline is None:
            self._head_deadline = asyncio.get_running_loop().call_later(
                self._limits.header_timeout, self._head_timed_out
            )

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        log.info("closed a connection whose request head did not arrive in %ss", self._limits.header_timeout)
        if self.transport is not None:
            self.transport.abort()

    def _head_done(self) -> None:
        self._head_bytes = 0
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        self._draining = True
        await super().shutdown(timeout)

    # aiohttp's request loop sets `_waiter` when it starts waiting for the next request: the
    # moment a connection handed over by the fast path can go back to it.
    @property
    def _waiter(self) -> asyncio.Future[None] | None:
        return cast("asyncio.Future[None] | None", _WAITER_SLOT.__get__(self))

    @_waiter.setter
    def _waiter(self, waiter: asyncio.Future[None] | None) -> None:
        _WAITER_SLOT.__set__(self, waiter)
        if waiter is not None and self._hand_back is not None:
            waiter.get_loop().call_soon(self._maybe_give_back)

    def resume_writing(self) -> None:
        super().resume_writing()
        waiter = self._waiter
        if self._hand_back is not None and waiter is not None and not waiter.done():
            waiter.get_loop().call_soon(self._maybe_give_back)  # held back while paused

    def _maybe_give_back(self) -> None:
        if self._hand_back is not None and self._between_requests():
            stash, self._stash = self._stash, b""
            self._give_back(stash, self._hand_back)

    def data_received(self, data: bytes) -> None:
        if self._hand_back is not None and data and self._request_count and self._done_with_requests():
            # The next request begins while the last one is still being finished (the client
            # read its answer before aiohttp's request loop came back round): kept aside, and
            # given back with the connection once the loop waits, unless it grows too large for a
            # head, when the full path takes it after all.
            if not self._stash:
                self._stash_started = asyncio.get_running_loop().time()
            self._stash += data
            if self._between_requests():
                self._maybe_give_back()
                return
            if len(self._stash) <= self._limits.max_head_size:
                return
            data, self._stash = self._stash, b""
            if self._limits.header_timeout and self._head_deadline is None:
                # Due from its first byte, not from now.
                self._head_deadline = asyncio.get_running_loop().call_at(
                    self._stash_started + self._limits.header_timeout, self._head_timed_out
                )
        elif self._stash:
            data, self._stash = self._stash + data, b""
        body_in_flight = self._last_payload is not None and not self._last_payload.is_eof()
        if self._draining and body_in_flight and self.transport is not None:
            # On shutdown aiohttp marks every connection closing and from then on drops every byte
            # that arrives, so an upload in flight would stall until shutdown_grace ran out, then
            # fail. Keep reading its body while the handler finishes; the connection still closes
            # after this request, and nothing after the body is read as one.
            closing = (self._close, self._force_close)
            self._close = self._force_close = False
            try:
                self._receive(data)
            finally:
                self._close, self._force_close = closing
            return
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        awaiting_head = self._last_payload is None or self._last_payload.is_eof()
        if data and awaiting_head:
            self._arm_head_deadline()
            self._head_bytes += len(data)
        parsed_before = self._request_count
        super().data_received(data)
        if self._request_count != parsed_before:
            self._head_done()
            if self._messages:
                message, payload = self._messages[-1]
                if isinstance(message, ErrInfo) and not awaiting_head and self._last_payload is not None:
                    self._body_unparsable(message)
                else:
                    self._last_payload = payload
                    self._time_pipelined_head(data, payload)
        elif awaiting_head and self._head_bytes > self._limits.max_head_size:
            self._refuse_large_head()

    def _time_pipelined_head(self, data: bytes, payload: StreamReader) -> None:
        """A read that completed a body-less request may also hold the start of the next head; that
        head is due within header_timeout like any other. (After a request with a body the split is
        not visible from here; such a head is bounded by keepalive_timeout and this one read.)"""
        if not isinstance(payload, EmptyStreamReader):
            return
        end = data.rfind(b"\r\n\r\n")
        trailing = len(data) - (end + 4) if end >= 0 else 0
        if trailing > 0:
            self._arm_head_deadline()
            self._head_bytes = trailing

    def _body_unparsable(self, error: ErrInfo) -> None:
        """The parser failed inside a request body (bad chunking). aiohttp would queue the failure
        as a separate request and leave the body waiting for bytes that never come: the request
        being forwarded would hang. Fail that body instead, so its request is answered with 400."""
        self._messages.pop()
        if self._last_payload is not None:
            self._last_payload.set_exception(MalformedBody(message=error.message))
            # Ended too, so that aiohttp's lingering read after the answer does not trip over it.
            self._last_payload.feed_eof()
            self._last_payload = None
        self.close()  # nothing after this point of the stream can be read as a request

    def _refuse_large_head(self) -> None:
        log.info("refused a request head over %d bytes", self._limits.max_head_size)
        self._head_done()
        transport = self.transport
        if transport is None:
            return
        if not self._request_in_progress and not self._messages:
            transport.write(_head_too_large_response())
        # Nothing after this point of the stream can be read as a request.
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:
            return  # refused in connection_made: aiohttp never saw this connection
        self._limits.closed()
        self._counted = False
        self._head_done()
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
        # Requests aiohttp could not parse reach no app, so no response hook adds this header.
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response


class _Server(web.Server):
    limits: ConnectionLimits
    gateway: Application | None  # None: every connection to aiohttp's handler (fast_path: false)
    sections: Sections  # the fast path's, for every connection of this server

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        if self.gateway is not None:
            return FastPathConnection(self.gateway, self.limits, self, self._hand_off, self.sections)
        return self._handler()

    def _handler(self) -> _RegistryErrorRequestHandler:
        return _RegistryErrorRequestHandler(self, limits=self.limits, loop=self._loop, **self._kwargs)

    def _hand_off(
        self, transport: asyncio.Transport, data: bytes, head_deadline: float | None, write_paused: bool
    ) -> None:
        handler = self._handler()
        handler._hand_back = self._take_back
        handler.adopt(transport, data, head_deadline, write_paused)

    def _take_back(self, transport: asyncio.Transport, data: bytes, head_started: float) -> None:
        assert self.gateway is not None
        connection = FastPathConnection(self.gateway, self.limits, self, self._hand_off, self.sections)
        transport.set_protocol(connection)
        connection.resume(transport, data, head_started)


def _not_origin_form(request: BaseRequest) -> web.StreamResponse | None:
    """The answer to a request whose target is not a path (absolute-form `GET http://x/`,
    authority-form `CONNECT x:80`, asterisk-form `OPTIONS *`): a proxy's requests, which aiohttp's
    router would read as a path (a redirect listener made `https://xhttp//x/` of one), or None."""
    if request.raw_path.startswith("/"):
        return None
    log.info("refused a request target that is not a path from %s", request.remote)
    response = error_response(400, "UNSUPPORTED", "the request target must be a path")
    response.headers["Server"] = SERVER_NAME  # no app saw this request, so no hook adds it
    response.force_close()
    return response


class ListenerRunner(web.AppRunner):
    """Every listener the gateway opens (listen, metrics_listen, redirect_listen) runs on this,
    built by `listener_runner`: the same connection limits (max_connections, header_timeout,
    max_head_size, max_header_size, keepalive_timeout), requests it cannot parse answered in the
    registry's error format with one log line, and no software versions in the Server header.

    The gateway's own app is served by `Gateway.serve` directly, on the fast path when it is on;
    any other app through its router, with request targets other than a path refused and its
    error answers (404, 405...) in the registry's format."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self._gateway = app.get(APPLICATION_KEY)
        if self._gateway is None:
            # Added before the runner's setup freezes the app.
            app.on_response_prepare.append(_server_header)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application; only the handler class differs.
        server.__class__ = _Server
        cast(_Server, server).limits = self.limits
        make_request = server.request_factory

        def request_factory(message: RawRequestMessage, *args: Any) -> BaseRequest:
            # aiohttp answers requests it could not parse through a placeholder message of
            # version 1.0; answer them as HTTP/1.1, the version every client here speaks.
            if message is ERROR:
                message = message._replace(version=HttpVersion11)
            return make_request(message, *args)

        server.request_factory = request_factory
        cast(_Server, server).sections = Sections()
        gateway = self._gateway
        if gateway is None:
            cast(_Server, server).gateway = None
            server.request_handler = _routed(server.request_handler)
            return server
        # Straight to the gateway: aiohttp's router, middleware and signals would cost as much per
        # request as all of the gateway's own decisions (the app has one catch-all route anyway).
        server.request_handler = gateway.serve
        cast(_Server, server).gateway = gateway if gateway.settings.fast_path else None
        return server


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """A routed app's responses: aiohttp would send `Server: Python/3.x aiohttp/3.x`."""
    response.headers["Server"] = SERVER_NAME


def _routed(
    handle: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
    """An app's router behind the checks every listener makes: only a path as the target, and
    the router's own error answers (404, 405) in the registry's format."""

    async def serve(request: BaseRequest) -> web.StreamResponse:
        refused = _not_origin_form(request)
        if refused is not None:
            return refused
        try:
            return await handle(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # a redirect: aiohttp sends it as it is
            headers = {
                name: value for name, value in exc.headers.items() if name.lower() in _KEPT_ERROR_HEADERS
            }
            return error_response(exc.status, "UNSUPPORTED", exc.reason.lower(), headers=headers)

    return serve


_KEPT_ERROR_HEADERS = ("allow", "www-authenticate")


def listener_runner(app: web.Application, settings: Settings) -> ListenerRunner:
    """The one way the gateway builds a listener: every one gets the same limits from the settings
    (each its own count of connections), error handling and headers (ListenerRunner)."""
    limits = ConnectionLimits(settings.max_connections, settings.header_timeout, settings.max_head_size)
    return ListenerRunner(
        app,
        limits,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace,
        max_line_size=settings.max_header_size,
        max_field_size=settings.max_header_size,
        keepalive_timeout=settings.keepalive_timeout,
    )
