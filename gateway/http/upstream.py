"""The registry client: a pool of keep-alive HTTP/1.1 connections on asyncio protocols.

The request path's own client, instead of aiohttp's ClientSession, because that was the largest
single cost per proxied request (about a third of the gateway's CPU in the profile, docs/performance.md,
"Where the time goes"): a session request builds URL objects, header multidicts, a request and a
response object, timers and a task per request. Here a request is one pre-built head written to a
pooled transport, and the response head is parsed by llhttp (through httptools, the parser uvicorn
uses) straight from `data_received`; an answer head to GET or HEAD seen before is taken as it was
read (KnownHead); a body of a declared length is counted and queued as read (llhttp's copy of each
body byte had been half the gateway's CPU per byte pulled), other bodies go through llhttp.
Two ways to send: `request`, a coroutine that waits for a connection and the answer head; and
`send_at_once`, for the fast path's requests without a body, which sends on an idle
pooled connection there and then and calls back with the answer head: no task, coroutine or
future per request (docs/performance.md, "The registry's answer").

What the registry sees is exactly what the caller built: the head bytes as given (see
`forwarding.upstream_request_head`), then the body with the framing we chose: the declared length
as sent, or chunked encoding made here. Responses are streamed: at most HIGH_WATER bytes wait in
a connection before it stops reading from the registry.

Failures are one of three exceptions (raised by `request`, handed to send_at_once's callback):
NoConnection (none within `connect_timeout`, whether the registry is unreachable or every pooled
connection is busy), UpstreamTimeout (the registry went quiet for `read_timeout`), UpstreamError
(refused, closed, or sent what llhttp cannot parse).
"""

from __future__ import annotations

import asyncio
import collections
import http
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httptools
from yarl import URL

# A connection stops reading from the registry when this much response body waits for the client.
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
# A body of a declared length with at least BODY_READ_MIN bytes still to come is read into blocks
# of BODY_BLOCK bytes (_BlockReader); a block with less room than BODY_READ_MIN left is not read into.
BODY_BLOCK = 1024 * 1024
BODY_READ_MIN = 64 * 1024
# A body at most this large that came whole with its head may be taken at once (whole_body): as
# small as what aiohttp's server writes without waiting for the client to drain.
WHOLE_BODY_MAX = 64 * 1024
# An idle pooled connection older than this is closed rather than reused (the registry may have
# dropped it already; Go's servers close idle connections after a while).
IDLE_TIMEOUT = 30.0
_HEAD_END = b"\r\n\r\n"
_REASON_CHARACTERS = bytes(range(0x20, 0x7F)) + b"\t"
# Answer heads to GET and HEAD kept as read (KnownHead): at most this many (then all are dropped:
# the registry's Date ends most of them within a second anyway), none larger than this.
KNOWN_HEADS_MAX = 256
KNOWN_HEAD_SIZE_MAX = 4096


@dataclass(slots=True, eq=False)
class KnownHead:
    """An answer head as llhttp read it, kept by its bytes. llhttp reads the same bytes the same
    way from a fresh start (it is never told the request's method: it gets heads alone), so when
    the registry sends the same head again (the same manifest or blob asked again within the
    second its Date names), the parts are taken from here instead of being parsed again. An answer
    to GET takes one only when its body is framed by a declared length (or has none), which is
    counted here anyway; a chunked one, or one until the end, is read by llhttp. `downstream`:
    what the fast path made of it for the client (gateway.http.fastpath), kept here so that it lives
    and dies with the head."""

    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    keep_alive: bool
    body_length: int | None  # declared by Content-Length alone (_body_framing); else None
    # By request method: a HEAD and a GET of one manifest get the same head, answered apart.
    downstream: dict[str, object] = field(default_factory=dict)


def _body_framing(headers: Sequence[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """How a response head (as llhttp accepted it: one valid Content-Length at most, never with
    Transfer-Encoding) frames its body, when it has one: (the declared length, or None when
    Transfer-Encoding or nothing frames it; whether it runs until the end of the connection)."""
    length: bytes | None = None
    encoded = False
    for name, value in headers:
        name = name.lower()
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            encoded = True
    declared = int(length) if length is not None and not encoded else None
    return declared, length is None and not encoded


class PendingExchange(Protocol):
    """An exchange UpstreamPool.send_at_once started, until its callback is called."""

    def cancel(self) -> None: ...


class UpstreamError(Exception):
    """The registry refused or closed the connection, or answered what is not HTTP/1.1."""


class UpstreamTimeout(UpstreamError):
    """The registry sent nothing for `read_timeout`."""


class NoConnection(UpstreamTimeout):
    """No connection to the registry within `connect_timeout`: unreachable, or every one busy."""


class _Connection(asyncio.Protocol):
    """One connection to the registry, carrying one exchange at a time."""

    def __init__(self) -> None:
        # Made in the loop (create_connection's factory); kept: get_running_loop() is a getpid().
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._quiet_limit: float | None = None
        self._wait_started = 0.0
        self._reset(head_only=False)
        self._known_heads_apply = False
        self._expecting = False
        # The pool's (UpstreamPool._known_heads), shared by its connections.
        self.known_heads: dict[bytes, KnownHead] = {}
        # Called once the answer head is read or the exchange failed, instead of a waiter
        # (UpstreamPool.send_at_once).
        self._on_head: Callable[[], None] | None = None
        self._block_reader: _BlockReader | None = None

    def _reset(self, head_only: bool) -> None:
        self.known: KnownHead | None = None  # the answer head, as kept (KnownHead)
        self.cancelled = False
        self.resend: asyncio.Future[UpstreamResponse] | None = None  # the request sent again
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_complete = False
        self.complete = False
        self.keep_alive = False
        self.reusable = True
        self._head_only = head_only
        self._head_buffer = b""
        self._interim = False
        self._first_head = True
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._until_eof = False
        self._body_left = 0  # body bytes still to come, when the answer declared its length

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._block_reader is not None:
            # Blocks go now, not with a collection of the cycle the reader is in (views still
            # queued keep theirs).
            self._block_reader.end()
            self._block_reader = None
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
            self._quiet_timer = None
        if self._expecting and not self.complete:
            if self.head_complete and self._until_eof and exc is None and self._error is None:
                self.complete = True  # a body delimited by the end of the connection
            elif self._error is None:
                self._error = UpstreamError(
                    "the registry closed the connection" + (f": {exc}" if exc else "")
                )
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(UpstreamError("the registry closed the connection"))
        if self._on_head is not None:
            self._head_or_failure()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self._expecting or self.complete:
            # Bytes nobody asked for: this connection cannot be trusted with another exchange.
            self.reusable = False
            if self.transport is not None:
                self.transport.close()
            return
        try:
            if self._body_left:
                self._body_received(data)
            elif not self.head_complete:
                self._head_received(data)
            else:
                self._parser_now().feed_data(data)  # a chunked body, or one until the end
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the registry switched protocols"))
        except (httptools.HttpParserError, UpstreamError) as exc:
            self._fail(exc if isinstance(exc, UpstreamError) else UpstreamError(f"bad response: {exc}"))
        if self._on_head is not None:
            self._head_or_failure()

    def _parser_now(self) -> httptools.HttpResponseParser:
        """This exchange's parser, made when first needed (an answer read before needs none)."""
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpResponseParser(self)
        return parser

    def _head_received(self, data: bytes) -> None:
        """Bytes of an answer, until its head is whole. llhttp gets the head alone: it cannot be
        told that a response answers HEAD (it would wait for the body its Content-Length
        announces), and a body of a declared length is counted here rather than parsed
        (_body_received). Heads before it that were interim answers (1xx) are skipped, as they
        come. The start of a head that came alone goes to llhttp at once (what is not HTTP is
        refused then, not waited out) and is kept (_hold_parsed) until its end is found."""
        held = self._head_buffer
        buffered = held + data
        end = buffered.find(_HEAD_END)
        if end < 0:
            self._hold_parsed(buffered, data)
            return
        self._head_buffer = b""
        head, rest = buffered[: end + 4], buffered[end + 4 :]
        head_only = self._head_only
        # Not after an interim answer (only a first head is kept or looked up), nor for uploads.
        keeps = self._first_head and self._known_heads_apply
        known = self.known_heads.get(head) if keeps else None
        kept = known is not None
        if (
            known is not None
            and not head_only
            and known.body_length is None
            and known.status not in (204, 304)
        ):
            known = None  # a body llhttp must frame (chunked, or until the end): read anew
        if known is not None:
            self.known = known
            self.status = known.status
            self.reason = known.reason
            self.headers = list(known.headers)
            self.keep_alive = known.keep_alive
            self.head_complete = True
            if head_only or known.status in (204, 304) or not known.body_length:
                self.complete = True
            else:
                self._body_left = known.body_length
            self._wake()
            if not head_only:
                self._after_head(rest)
                return
        else:
            parser = self._parser_now()
            parser.feed_data(head[len(held) :])  # llhttp has had what was held
            while not self.head_complete:  # that was an interim answer: the final head follows
                keeps = False  # only an exchange's first head is kept (llhttp read it from its start)
                end = rest.find(_HEAD_END)
                if end < 0:
                    self._hold_parsed(rest, rest)
                    return
                head, rest = rest[: end + 4], rest[end + 4 :]
                parser.feed_data(head)
            if keeps and not kept and len(head) <= KNOWN_HEAD_SIZE_MAX:
                # One seen before and declined (a chunked answer to GET) stays as it is.
                headers = tuple(self.headers)
                length = _body_framing(headers)[0]
                if head_only or length is not None or self.status in (204, 304):
                    known_heads = self.known_heads
                    if len(known_heads) >= KNOWN_HEADS_MAX:
                        known_heads.clear()
                    known = known_heads[head] = KnownHead(
                        self.status, self.reason, headers, self.keep_alive, length
                    )
                    self.known = known
            if not head_only:
                self._after_head(rest)
                return
        if rest:
            self.reusable = False  # more than the head answered a HEAD

    def _after_head(self, rest: bytes) -> None:
        """What came after the head of an answer with a body (or one of 204 or 304)."""
        if self._body_left:
            if rest:
                self._body_received(rest)
            elif self._body_left >= BODY_READ_MIN:
                self._read_blocks()
        elif self.complete:
            if rest:
                raise UpstreamError("the registry sent more than its answer")
        elif rest:
            self._parser_now().feed_data(rest)

    def _body_received(self, data: bytes) -> None:
        """Body bytes of a declared length: queued as they came (llhttp would copy them once more,
        which for a blob was most of the gateway's CPU per byte)."""
        left = self._body_left
        size = len(data)
        excess = size > left
        if excess:
            # More than the declared length: the answer ends where it said, and the connection is
            # dropped after it, as for bytes after a parsed answer.
            data, size = data[:left], left
        self._queue(data)
        self._after_body_bytes(size)
        if self._body_left >= BODY_READ_MIN:
            self._read_blocks()
        if excess:
            raise UpstreamError("the registry sent more than its answer")

    def _after_body_bytes(self, size: int) -> None:
        """`size` bytes of a body of a declared length were queued (by _body_received or
        _BlockReader): counted off, and the answer complete at its end."""
        left = self._body_left = self._body_left - size
        if not left:
            self.complete = True
            self._read_data()
            self._wake()

    def _read_blocks(self) -> None:
        """The rest of the body is read into blocks (_BlockReader) rather than given to
        data_received as new bytes objects: one copy of each byte fewer."""
        transport = self.transport
        if transport is None or self.closed:
            return
        reader = self._block_reader
        if reader is None:
            reader = self._block_reader = _BlockReader(self)
        self._switch_protocol(transport, reader)

    def _read_data(self) -> None:
        """Back to data_received once the body read into blocks is whole."""
        reader = self._block_reader
        if reader is None or self.transport is None or self.transport.get_protocol() is not reader:
            return
        reader.end()
        self._switch_protocol(self.transport, self)

    def _switch_protocol(self, transport: asyncio.Transport, protocol: asyncio.BaseProtocol) -> None:
        # A transport chooses how to read when reading starts (uvloop; asyncio's as it is set).
        transport.pause_reading()
        transport.set_protocol(protocol)
        if not self._reading_paused:
            transport.resume_reading()

    def _queue(self, body: bytes | memoryview) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _hold_parsed(self, partial: bytes, unparsed: bytes) -> None:
        """The start of a head, kept until the rest of it comes; llhttp reads what it has not."""
        if len(partial) > 1024 * 1024:
            raise UpstreamError("the registry's response head is too large")
        self._head_buffer = partial
        self._parser_now().feed_data(unparsed)
        if self.head_complete:
            # llhttp saw a head end where there is no CRLF CRLF: it cannot be split from its body.
            raise UpstreamError("bad response: a head that does not end in CRLF CRLF")

    # --- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # More bytes after the whole answer, in the same read: neither this answer's body nor
            # the next one's (nothing was asked); the connection is dropped (data_received).
            raise UpstreamError("the registry sent more than its answer")

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_complete:
            return  # a chunked body's trailer fields: not headers of the answer already given
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser_now()
        status = parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (the registry never gets Expect from us, but may send one):
            # skipped, the real answer follows on the same connection.
            self._interim = True
            self._first_head = False
            self.headers = []
            self.reason = b""
            return
        self.status = status
        self.keep_alive = parser.should_keep_alive()
        self.head_complete = True
        if self._head_only or status in (204, 304):
            self.complete = True
        else:
            # llhttp ends the message itself when the declared length is 0.
            declared, self._until_eof = _body_framing(self.headers)
            if declared is not None:
                self._body_left = declared
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            self.reusable = False
            return
        self._queue(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._wake()

    # Not wanted: None, as httptools looks each callback up (a missing one costs it an
    # AttributeError, per parser, which is per exchange).
    on_chunk_header = on_chunk_complete = None

    # --- used by the pool ------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _head_or_failure(self) -> None:
        """The callback of send_at_once, once: the head is read, or the exchange has failed. Called
        after llhttp returns (never from its callbacks: the callback may start the next exchange
        on this very connection)."""
        if self.head_complete or self._error is not None or self.closed:
            callback, self._on_head = self._on_head, None
            if callback is not None:
                callback()

    def watch(self, quiet_limit: float, on_head: Callable[[], None]) -> None:
        """Call `on_head` once the answer head is read or the exchange fails (the registry quiet
        for `quiet_limit` seconds included), instead of waiting in a coroutine."""
        self._on_head = on_head
        loop = self._loop
        self._wait_started = loop.time()
        self._quiet_limit = quiet_limit
        if self._quiet_timer is None:
            self._quiet_timer = loop.call_at(self._wait_started + quiet_limit, self._check_quiet)

    def cancel(self) -> None:
        """Give up on the exchange under way (the connection is closed; a watcher is told), or on
        the request sent again for it (UpstreamPool._head_or_failure)."""
        self.cancelled = True
        if self.resend is not None:
            self.resend.cancel()
        self._fail(UpstreamError("the exchange was cancelled"))
        if self._on_head is not None:
            self._head_or_failure()

    async def wait(self, quiet_limit: float | None) -> None:
        """Until the registry sends something (or fails); at most `quiet_limit` seconds."""
        if self._error is not None:
            raise self._error
        loop = self._loop
        waiter = loop.create_future()
        self._waiter = waiter
        # Not a timer per wait (this runs for every response, often twice): one timer per
        # connection, checked when it fires against the wait then in progress, and re-armed for
        # what is left of it.
        self._wait_started = loop.time()
        self._quiet_limit = quiet_limit
        if quiet_limit is not None and self._quiet_timer is None:
            self._quiet_timer = loop.call_at(self._wait_started + quiet_limit, self._check_quiet)
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
        if self._error is not None and not self._chunks and not self.complete:
            raise self._error

    def _check_quiet(self) -> None:
        self._quiet_timer = None
        quiet_limit = self._quiet_limit
        if (self._waiter is None and self._on_head is None) or quiet_limit is None or self.closed:
            return  # no wait with a limit in progress: the next one arms the timer again
        loop = self._loop
        deadline = self._wait_started + quiet_limit
        if loop.time() >= deadline:
            self._fail(UpstreamTimeout(f"the registry sent nothing for {quiet_limit:g} s"))
            if self._on_head is not None:
                self._head_or_failure()
        else:
            self._quiet_timer = loop.call_at(deadline, self._check_quiet)

    def begin(self, head: bytes, method: str) -> None:
        self._reset(method == "HEAD")
        # Answer heads to GET and HEAD are kept and looked up (KnownHead); an upload's names an
        # upload of its own and would only push others out.
        self._known_heads_apply = method in ("GET", "HEAD")
        self._expecting = True
        self._parser = None  # made when needed (_parser_now)
        assert self.transport is not None
        self.transport.write(head)

    async def drain(self, quiet_limit: float) -> None:
        if self._error is not None:
            raise self._error
        if self.closed:
            raise UpstreamError("the registry closed the connection")
        if self._write_paused:
            self._drain_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(quiet_limit):
                    await self._drain_waiter
            except TimeoutError:
                # The registry stopped reading the upload: the connection and its slot are freed.
                error = UpstreamTimeout(f"the registry took no request bytes for {quiet_limit:g} s")
                self._fail(error)
                raise error from None

    async def send_body(self, body: AsyncIterator[bytes], chunked: bool, quiet_limit: float) -> None:
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if self.closed or self._error is not None:
                raise self._error or UpstreamError("the registry closed the connection")
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await self.drain(quiet_limit)
        if chunked:
            transport.write(b"0\r\n\r\n")
        await self.drain(quiet_limit)

    async def read_head(self, quiet_limit: float | None) -> None:
        while not self.head_complete:
            await self.wait(quiet_limit)
        # An error after the head belongs to the body: reported when the body is read.

    async def read(self, quiet_limit: float) -> bytes | memoryview:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered < LOW_WATER and self.transport is not None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            await self.wait(quiet_limit)

    def whole_body(self) -> collections.deque[bytes | memoryview] | None:
        """The body, when all of it has come and waits here, and is small (WHOLE_BODY_MAX); taken
        out. None otherwise: read() hands it on, with the waits for a slow client a large body
        needs. Never while reading is paused (a small body never pauses it): read() resumes it."""
        if not self.complete or self._error is not None:
            return None
        if self._buffered > WHOLE_BODY_MAX or self._reading_paused:
            return None
        chunks, self._chunks = self._chunks, collections.deque()
        self._buffered = 0
        return chunks

    def finished(self) -> bool:
        """Whether this connection may carry another exchange."""
        self._expecting = False
        return (
            self.complete
            and self.keep_alive
            and self.reusable
            and self._error is None
            and not self.closed
            and not self._chunks
        )

    def close(self) -> None:
        self._expecting = False
        if self.transport is not None and not self.closed:
            self.transport.close()


def _reason(status: int, sent: bytes) -> str:
    """The reason phrase for the client: the registry's when it is plain text (llhttp refuses CR
    and LF in it, not other control characters, which a terminal or log would act on), else
    the standard one for the status."""
    if sent == b"OK":  # nearly every answer: no check to make
        return "OK"
    if not sent.translate(None, _REASON_CHARACTERS):
        return sent.decode("ascii")
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def first_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header `name` (in lower case) in raw headers, decoded; None when absent."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("utf-8", "replace")
    return None


class _BlockReader(asyncio.BufferedProtocol):
    """The transport's protocol while a long body of a declared length comes (_Connection
    switches to it and back): the registry's bytes are read straight into blocks of our own and
    queued as views of them, where data_received would have them copied into a new bytes object
    per read. A read may take a little past the declared length, so that bytes the registry sent
    after the body drop the connection before it goes back to the pool. A block is read into
    again only when no view of it is left anywhere (the client's transport holds the views it has
    not sent yet, and a reader may keep one): a bytearray refuses to change size while a view of
    it exists, which says so. Blocks are dropped with the body."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._blocks: list[bytearray] = []
        self._block: bytearray | None = None
        self._offset = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        block = self._block
        if block is None or BODY_BLOCK - self._offset < BODY_READ_MIN:
            block = self._block = self._unused_block()
            self._offset = 0
        offset = self._offset
        # A little past the declared length: bytes the registry sent after the body, already
        # here, come with its last read and drop the connection (buffer_updated), rather than wait
        # for a read that may come after the connection went back to the pool.
        room = min(BODY_BLOCK - offset, self._connection._body_left + BODY_READ_MIN)
        return memoryview(block)[offset : offset + room]

    def buffer_updated(self, nbytes: int) -> None:
        block = self._block
        assert block is not None
        offset = self._offset
        self._offset = offset + nbytes
        connection = self._connection
        size = min(nbytes, connection._body_left)
        if size:
            connection._queue(memoryview(block)[offset : offset + size])
            connection._after_body_bytes(size)
        if nbytes > size:
            # More than the declared length: the answer ends where it said, and the connection is
            # dropped after it, as for bytes after a parsed answer.
            connection._fail(UpstreamError("the registry sent more than its answer"))

    def _unused_block(self) -> bytearray:
        for block in self._blocks:
            if block is self._block:
                continue
            # A bytearray cannot change size while a view of it exists (a buffer export, held by
            # every memoryview made from it): popping a byte is refused then. Exact on every
            # Python, unlike a reference count; the byte is put back at once.
            try:
                block.pop()
            except BufferError:
                continue
            block.append(0)
            return block
        block = bytearray(BODY_BLOCK + 1)  # the last byte is the one popped
        self._blocks.append(block)
        return block

    def end(self) -> None:
        self._blocks = []
        self._block = None
        self._offset = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection.connection_lost(exc)

    def pause_writing(self) -> None:
        self._connection.pause_writing()

    def resume_writing(self) -> None:
        self._connection.resume_writing()


class UpstreamResponse:
    """The registry's answer: status and headers at once, the body as it arrives."""

    def __init__(self, pool: UpstreamPool, connection: _Connection) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.reason = _reason(connection.status, connection.reason)
        self.raw_headers = connection.headers
        self.known = connection.known

    def header(self, name: bytes) -> str | None:
        """The first value of a header (name in lower case), decoded; None when absent."""
        return first_header(self.raw_headers, name)

    async def read(self) -> bytes:
        """The next piece of the body; b"" at its end. Raises UpstreamError, UpstreamTimeout."""
        chunk = await self.read_chunk()
        return chunk if type(chunk) is bytes else bytes(chunk)

    async def read_chunk(self) -> bytes | memoryview:
        """As `read`, for a caller that hands each piece on to a transport: a piece may be a view
        of a block the body is read into, read into again once no view of it is left."""
        if self._connection is None:
            return b""
        return await self._connection.read(self._pool.read_timeout)

    def whole_body(self) -> collections.deque[bytes | memoryview] | None:
        """All of the body, when it has come whole already and is small (a manifest usually comes
        with its head); None otherwise, for read(). The pieces are taken: read() has none."""
        if self._connection is None:
            return None
        return self._connection.whole_body()

    async def read_at_most(self, limit: int) -> bytes:
        data = b""
        while len(data) < limit:
            chunk = await self.read()
            if not chunk:
                break
            data += chunk
        return data[:limit]

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if the exchange is whole."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool._release(connection)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.release()


class _Slots:
    """At most `limit` exchanges at once; those waiting are served first come, first served. A
    slot is taken at once when one is free (take_now, for send_at_once), or waited for (take)."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take_now(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self, deadline: float) -> None:
        """A slot, or NoConnection at `deadline` (loop time)."""
        if self.take_now():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot as it gave up: passed on
            if isinstance(exc, TimeoutError):
                raise NoConnection("every connection to the registry is busy") from None
            raise

    def give(self) -> None:
        """A slot back: to the first waiting, else free."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class UpstreamPool:
    """Keep-alive connections to one registry, at most `limit` of them in use at once."""

    def __init__(
        self,
        upstream: URL,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = upstream.host or "127.0.0.1"
        self.port = upstream.port or (443 if upstream.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if upstream.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._slots = _Slots(limit) if limit > 0 else None
        self._idle: list[_Connection] = []
        self._closed = False
        self._known_heads: dict[bytes, KnownHead] = {}  # shared by the connections (KnownHead)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resends: set[asyncio.Future[UpstreamResponse]] = set()  # send_at_once's, held until done

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, connection = await loop.create_connection(_Connection, self.host, self.port, ssl=self._ssl)
        except TimeoutError:
            raise NoConnection("no connection to the registry in time") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to the registry: {exc.strerror or exc}") from None
        connection.known_heads = self._known_heads
        return connection

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_TIMEOUT:
                return connection
            connection.close()
        return None

    async def request(
        self,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None = None,
        chunked: bool = False,
    ) -> UpstreamResponse:
        """Send one request (its head already serialised) and wait for the response head."""
        if self._closed:
            raise UpstreamError("the gateway is shutting down")
        loop = self._loop
        if loop is None:  # kept: asyncio.get_running_loop() is a getpid() system call in 3.11
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        if self._slots is not None and not self._slots.take_now():
            await self._slots.take(deadline)
        try:
            connection = self._idle_connection()
            reused = connection is not None
            if connection is None:
                connection = await self._connect(deadline)
            try:
                if body is None:  # most requests: the exchange without two coroutines more
                    connection.begin(head, method)
                    while not connection.head_complete:
                        await connection.wait(self.read_timeout)
                else:
                    await self._exchange(connection, method, head, body, chunked)
            except UpstreamError as exc:
                connection.close()
                # A pooled connection the registry closed as we picked it up: a request without a
                # body is sent again, once, on a new connection (nothing of it was processed).
                if not reused or body is not None or isinstance(exc, UpstreamTimeout):
                    raise
                if connection.status or connection.headers:
                    raise
                connection = await self._connect(deadline)
                try:
                    await self._exchange(connection, method, head, None, False)
                except BaseException:
                    connection.close()
                    raise
            except BaseException:
                connection.close()
                raise
        except BaseException:
            if self._slots is not None:
                self._slots.give()
            raise
        return UpstreamResponse(self, connection)

    def send_at_once(
        self, method: str, head: bytes, answered: Callable[[UpstreamResponse | UpstreamError], None]
    ) -> PendingExchange | None:
        """Send a request without a body now, if a pooled connection is idle and a slot is free,
        and call `answered` with the response once its head is read, or with the failure (the
        exceptions `request` raises): an exchange without a task or coroutine, for the fast path
        (docs/performance.md, "The registry's answer"). None: nothing was sent (`request` waits for a
        connection). Until `answered` is called, the exchange may be given up with the returned
        connection's `cancel()`."""
        if self._closed:
            return None
        slots = self._slots
        if slots is not None and not slots.take_now():
            return None
        connection = self._idle_connection()
        if connection is None:
            if slots is not None:
                slots.give()
            return None
        try:
            connection.begin(head, method)
        except BaseException:
            connection.close()
            if slots is not None:
                slots.give()
            raise
        connection.watch(self.read_timeout, lambda: self._head_or_failure(connection, method, head, answered))
        return connection

    def _head_or_failure(
        self,
        connection: _Connection,
        method: str,
        head: bytes,
        answered: Callable[[UpstreamResponse | UpstreamError], None],
    ) -> None:
        if connection.head_complete:
            answered(UpstreamResponse(self, connection))  # an error after the head is the body's
            return
        connection.close()
        error = connection._error
        if not isinstance(error, UpstreamError):
            error = UpstreamError("the registry closed the connection")
        if (
            connection.cancelled
            or isinstance(error, UpstreamTimeout)
            or connection.status
            or connection.headers
        ):
            if self._slots is not None:
                self._slots.give()
            answered(error)
            return
        # A pooled connection the registry closed as we picked it up: sent again, once, on a new
        # connection (nothing of it was processed), as `request` does.
        resend = asyncio.ensure_future(self._send_again(method, head))
        connection.resend = resend
        self._resends.add(resend)
        resend.add_done_callback(lambda _: self._sent_again(resend, answered))

    async def _send_again(self, method: str, head: bytes) -> UpstreamResponse:
        connection = await self._connect(asyncio.get_running_loop().time() + self.connect_timeout)
        try:
            await self._exchange(connection, method, head, None, False)
        except BaseException:
            connection.close()
            raise
        return UpstreamResponse(self, connection)

    def _sent_again(
        self,
        resend: asyncio.Future[UpstreamResponse],
        answered: Callable[[UpstreamResponse | UpstreamError], None],
    ) -> None:
        """The end of a request sent again (a done callback: it runs even when the task was
        cancelled before its first step, where the coroutine's own clean-up never runs)."""
        self._resends.discard(resend)
        if not resend.cancelled() and resend.exception() is None:
            answered(resend.result())
            return
        error = None if resend.cancelled() else resend.exception()
        if self._slots is not None:
            self._slots.give()
        if isinstance(error, UpstreamError):
            answered(error)
        else:
            answered(UpstreamError("the exchange was cancelled" if error is None else f"failed: {error!r}"))

    async def _exchange(
        self,
        connection: _Connection,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> None:
        connection.begin(head, method)
        if body is None:
            await connection.read_head(self.read_timeout)
            return
        sender = asyncio.ensure_future(connection.send_body(body, chunked, self.read_timeout))
        head_task = asyncio.ensure_future(connection.read_head(None))
        try:
            await asyncio.wait((sender, head_task), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            sender.cancel()
            head_task.cancel()
            raise
        body_sent = sender.done() and not sender.cancelled() and sender.exception() is None
        head_ok = head_task.done() and not head_task.cancelled() and head_task.exception() is None
        # An answer that came while the body was still going (or failing, as the registry closes
        # after answering early) is the registry's answer: it wins over the sender's failure.
        answered_early = head_ok and not body_sent
        if sender.done() and not answered_early:
            if sender.exception() is not None:
                head_task.cancel()
                sender.result()  # the client's body failed, or the registry went away: raised here
            try:
                async with asyncio.timeout(self.read_timeout):
                    await head_task
            except TimeoutError:
                error = UpstreamTimeout(f"the registry sent nothing for {self.read_timeout:g} s")
                connection._fail(error)
                raise error from None
            return
        # The registry answered before the body was sent (an error, usually): the rest of the
        # body is not sent, and this connection is not reused.
        if sender.done() and not sender.cancelled():
            sender.exception()  # retrieved: the answer is what counts
        sender.cancel()
        connection.reusable = False
        head_task.result()

    def _release(self, connection: _Connection) -> None:
        if connection.finished() and not self._closed:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()
        if self._slots is not None:
            self._slots.give()

    async def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()
        for resend in list(self._resends):  # their callers are told (send_at_once)
            resend.cancel()
