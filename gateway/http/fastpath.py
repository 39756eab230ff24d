"""The fast path: plain GET and HEAD requests the gateway allows, served on asyncio protocols.

Pulls are mostly small GET/HEAD requests (manifests, blob checks), and aiohttp's request and
response objects cost more per request than every decision of ours together (docs/performance.md,
"Where the time goes"). So every client connection starts here, on a protocol that parses request heads with
llhttp (httptools) and answers with bytes it builds itself.

A request is served here only when its head is unambiguous and its answer is a plain "allowed":
the whole head in what has arrived, one message to llhttp, HTTP/1.1, GET or HEAD, no body and no
header that could announce one (Content-Length, Transfer-Encoding, Expect, Upgrade), one Host,
printable ASCII throughout, within the size limits; then screening, authentication from what is
already verified (a cached login, a valid token) and the policy allow it outright. Anything else
(a partial head, a body, a challenge, a denial, a password still to check, ext_authz, the filtered
catalog, the token endpoint, an old client) hands the connection with every byte read so far to
aiohttp's RequestHandler (gateway.http.server), which answers exactly as it would have without this
path; the connection stays there. So the fast path adds no answer of its own to what the gateway
says: every refusal still comes from the proven path, and `fast_path: false` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import httptools
from aiohttp import web
from multidict import CIMultiDict

from gateway import forwarding
from gateway.audit import AuditRecord, new_record, operation_name
from gateway.config import Settings
from gateway.errors import API_VERSION, API_VERSION_HEADER, error_response
from gateway.http import answers
from gateway.http.aiohttp_internals import (
    SINGLETON_HEADERS,
    must_be_empty_body,
    rfc822_formatted_time,
    should_remove_content_length,
)
from gateway.http.limits import ConnectionLimits
from gateway.http.relay import ClientGone, Cut, relay
from gateway.http.upstream import (
    PendingExchange,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    first_header,
)
from gateway.metrics import Metrics
from gateway.routes import Operation
from gateway.screening import HeaderFacts

log = logging.getLogger("gateway.fastpath")

_METHODS = frozenset({b"GET", b"HEAD"})
# Headers that announce a body, or change how the connection goes on: their requests take the
# full path.
_NOT_HERE = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"te",
        b"trailer",
        b"sec-websocket-key1",  # aiohttp refuses any (400)
    }
)
# Names aiohttp's parser refuses twice (and so answers 400 for), and one more we take once.
_ONCE = frozenset(name.encode() for name in SINGLETON_HEADERS) | {b"authorization"}
_MAX_HEADERS = 100
_API_VERSION_NAME = API_VERSION_HEADER.lower().encode()
_API_VERSION_LINE = f"{API_VERSION_HEADER}: {API_VERSION}\r\n".encode()
# The registry's headers the gateway leaves out of an answer, besides hop-by-hop ones: by (an
# empty answer without a length, the gateway sends its own HSTS).
_ALSO_DROPPED = {
    (False, False): frozenset(),
    (True, False): frozenset({b"content-length"}),
    (False, True): frozenset({b"strict-transport-security"}),
    (True, True): frozenset({b"content-length", b"strict-transport-security"}),
}
# What a head may hold: printable ASCII and tabs, and CR and LF as llhttp reads line ends (it
# refuses them anywhere else), so no value holds a control character or a byte beyond ASCII.
_HEAD_BYTES = bytes(range(0x20, 0x7F)) + b"\t\r\n"


@dataclass(slots=True)
class Section:
    """A head's header section (from the end of its request line to the blank line) as parsed, and
    what is made of it. Kept gateway-wide (see Sections) for the peer and scheme it came with: a
    head from the same peer, on the same scheme, with the same section bytes takes it over instead
    of parsing, checking and filtering them again. `view` holds that peer and scheme. Never a
    decision: each head is still screened, routed and decided."""

    text: bytes
    raw_headers: tuple[tuple[bytes, bytes], ...]
    headers: CIMultiDict[str]  # shared by the requests that send it: read, never changed
    keep_alive: bool  # False: `Connection: close` (skopeo and podman send it every time)
    # Made by allowed_outright, once: the client's view (None until then), its credentials, and
    # screening.screen_headers for each method.
    view: forwarding.ClientView | None = None
    authorization: str | None = None
    screened: dict[str, HeaderFacts] = field(default_factory=dict)
    upstream_lines: bytes | None = None  # forwarding.upstream_header_lines, once
    # Once kept (see Sections): the last identity its credentials proved, for the next connection
    # of the same client (skopeo and podman open one per request).
    # The application's memo of the identity these credentials proved (admission.IdentityMemo):
    # the transport only carries it.
    memo: Any = None


# How many header sections the gateway keeps (see Sections), how many bytes of section text in all
# (the parsed parts take 15 to 30 times as much memory), and the largest section kept.
SECTIONS_KEPT = 512
SECTION_BYTES_KEPT = 256 * 1024
SECTION_KEPT_MAX = 8 * 1024


class Sections:
    """Header sections of the heads the fast path took lately, gateway-wide, by peer address,
    scheme and section bytes. Clients repeat their headers across connections far more than on
    one: skopeo and podman send `Connection: close` with every request, and the docker CLI's
    connections carry a request or two, yet in a push, pull and copy 31 of skopeo's 36 GET/HEAD
    heads, and in a push and pull 14 of docker's 20, had a section seen before on another
    connection (docs/performance.md, "Kept header sections").

    A section is kept the second time it is seen: the first time, only its hash is noted. A kept
    section costs memory (about 3 KiB in some 30 objects) and, once the oldest go, the work of
    making and freeing them; a client sending headers of its own on every request (a request id)
    would pay that on every request and never take one over (4% more instructions per HEAD,
    measured). Bounded: beyond `entries` sections, or `size` bytes of them, the oldest go (first
    in, first out: a lookup moves nothing), down to three quarters of both bounds at once; the
    hashes noted, likewise beyond 8 * `entries`. Sections larger than `largest` are not kept."""

    def __init__(
        self, entries: int = SECTIONS_KEPT, size: int = SECTION_BYTES_KEPT, largest: int = SECTION_KEPT_MAX
    ) -> None:
        self._kept: dict[tuple[str, str, bytes], Section] = {}
        self._seen_once: dict[int, None] = {}
        self._entries = entries
        self._size = size
        self._largest = min(largest, size * 3 // 4)  # never one that would leave no room for itself
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, peer: str, scheme: str, text: bytes) -> Section | None:
        return self._kept.get((peer, scheme, text))

    def keep(self, peer: str, scheme: str, section: Section) -> bool:
        """Note a section taken: kept if it was seen before (a hash collision only keeps one
        sooner; a lookup compares the bytes). True when kept now."""
        text = section.text
        if len(text) > self._largest:
            return False
        key = (peer, scheme, text)
        if key in self._kept:
            return False  # kept already (this object or another with the same bytes)
        fingerprint = hash(key)
        if fingerprint not in self._seen_once:
            self._seen_once[fingerprint] = None
            if len(self._seen_once) > 8 * self._entries:
                self._seen_once = dict.fromkeys(list(self._seen_once)[2 * self._entries :])
            return False
        self._kept[key] = section
        self._bytes += len(text)
        if len(self._kept) > self._entries or self._bytes > self._size:
            self._drop_oldest()
        return True

    def _drop_oldest(self) -> None:
        # Many at once, into a new dict: a dict keeps deleted entries' slots at its front until it
        # is rebuilt, so finding the oldest one by one would walk more of them each time.
        items = list(self._kept.items())
        entries, size = self._entries * 3 // 4, self._size * 3 // 4
        dropped = 0
        while dropped < len(items) and (len(items) - dropped > entries or self._bytes > size):
            self._bytes -= len(items[dropped][0][2])
            dropped += 1
        self._kept = dict(items[dropped:])


@dataclass(slots=True)  # made per request: not frozen (docs/performance.md, "Records made per request")
class ParsedHead:
    """A request head the fast path may take: method, target, and its header section."""

    method: str
    target: str
    section: Section

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self.section.raw_headers

    @property
    def headers(self) -> CIMultiDict[str]:
        return self.section.headers

    @property
    def keep_alive(self) -> bool:
        return self.section.keep_alive


class _HeadCollector:
    """llhttp's callbacks for one head."""

    __slots__ = (
        "begun",
        "completed",
        "headers",
        "keep_alive",
        "method",
        "parser",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.begun = 0
        self.completed = 0
        self.parser: httptools.HttpRequestParser | None = None
        self.version = ""
        self.keep_alive = False
        self.upgrade = True
        self.method = b""

    def on_headers_complete(self) -> None:
        # Read now: llhttp starts over on the next message once this one is complete.
        parser = self.parser
        if parser is not None:
            self.version = parser.get_http_version()
            self.keep_alive = parser.should_keep_alive()
            self.upgrade = parser.should_upgrade()
            self.method = parser.get_method()

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.completed += 1

    # Callbacks not wanted: None, as httptools looks each one up (a missing one costs it an
    # AttributeError, per parser).
    on_body = on_chunk_header = on_chunk_complete = None


def parse_head(head: bytes, max_line: int, max_field: int, last: Section | None = None) -> ParsedHead | None:
    """The request in `head` (ending with its blank line) if the fast path may take it, else None.
    Pure: the decision of what is plain enough, on the bytes alone. `last`: a section taken before
    (see Sections); when `head` ends with the same bytes, only its request line is read, and the
    result is the same as a full parse's (tests/test_fastpath.py checks both ways)."""
    if last is not None:
        line_end = head.find(b"\r\n")
        if len(head) - line_end == len(last.text) and head.endswith(last.text):
            return _with_section(head[:line_end], max_line, last)
    if head.translate(None, _HEAD_BYTES):  # one pass over the head, not one per value
        return None
    if b" \r\n" in head or b"\t\r\n" in head:
        return None  # a value ending in blanks: llhttp keeps them, aiohttp strips them; not guessed at
    collector = _HeadCollector()
    parser = httptools.HttpRequestParser(collector)
    collector.parser = parser
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    if collector.begun != 1 or collector.completed != 1 or collector.version != "1.1":
        return None
    method = collector.method
    url = collector.url
    if (
        method not in _METHODS
        or collector.upgrade
        or not head.startswith(b"%s %s HTTP/1.1\r\n" % (method, url))  # the one spelling
        or not url.startswith(b"/")
        or len(url) > max_line
        or b" " in url
        or b"\t" in url
        or len(collector.headers) > _MAX_HEADERS
    ):
        return None
    seen: set[bytes] = set()
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in collector.headers:
        lower = name.lower()
        if lower in _NOT_HERE or len(name) + len(value) + 2 > max_field:
            return None
        if lower in _ONCE:
            if lower in seen:
                return None
            seen.add(lower)
        headers.add(name.decode("ascii"), value.decode("ascii"))
    if b"host" not in seen:
        return None
    section = Section(head[head.find(b"\r\n") :], tuple(collector.headers), headers, collector.keep_alive)
    return ParsedHead(method.decode("ascii"), url.decode("ascii"), section)


_METHOD_NAMES = frozenset(method.decode() for method in _METHODS)


def _with_section(line: bytes, max_line: int, section: Section) -> ParsedHead | None:
    """A head whose header section was taken before: its request line read as parse_head reads it,
    the section's parts as they were. llhttp takes every printable ASCII byte in a target, so the
    exact spelling below is what a full parse accepts (tests/test_fastpath.py compares the two)."""
    if not line.isascii():
        return None
    text = line.decode("ascii")
    if not text.isprintable():  # control characters and tabs
        return None
    method, _, rest = text.partition(" ")
    target, _, version = rest.partition(" ")
    if method not in _METHOD_NAMES or version != "HTTP/1.1":
        return None
    if not target.startswith("/") or len(target) > max_line:
        return None
    return ParsedHead(method, target, section)


@dataclass(slots=True)  # made per request: not frozen (docs/performance.md, "Records made per request")
class Forward:
    """An allowed request, and what forwarding it needs."""

    operation: Operation
    view: forwarding.ClientView
    user: str | None
    rule: int | None
    authorization: str | None  # for the registry, in bearer mode


class Application(Protocol):
    """What the transports need of the application (gateway.app.Gateway), and nothing more: the
    settings and counters, the registry's connections, the gateway's own header lines, the
    decision for a head that may be answered here (gateway.admission), the full path's handler,
    and what ends a request. Decisions stay on the application's side of this line."""

    settings: Settings
    metrics: Metrics
    upstream: UpstreamPool | None
    hsts: str | None

    def own_headers(self, closing: bool = False) -> list[tuple[str, str]]: ...

    def finish_record(self, record: AuditRecord, started: float) -> None: ...

    def allowed_outright(self, head: ParsedHead, remote: str, scheme: str, memo: Any) -> Forward | None: ...

    def new_memo(self) -> Any: ...

    async def serve(self, request: web.BaseRequest) -> web.StreamResponse: ...


@dataclass(frozen=True, slots=True)
class AnswerHead:
    """What the client gets for the registry's answer head (answer_head), less what depends on
    the connection: the gateway's own lines, and the Date the registry did not send."""

    method: str  # of the request answered
    hsts: bool  # whether the gateway sends its own Strict-Transport-Security
    lines: bytes  # the status line and header lines
    digest: str | None  # Docker-Content-Digest, for the audit record
    own_error_body: bool  # an error the gateway answers with a body of its own (answers.replace_error)
    empty: bool  # no body follows
    chunked: bool  # the body is sent in chunked encoding (the registry gave no length)
    add_date: bool  # the registry sent no Date


def answer_head(
    method: str, status: int, reason: str, headers: Sequence[tuple[bytes, bytes]], hsts: bool
) -> AnswerHead:
    """The head the client gets for the registry's answer (status, reason as upstream._reason
    made it safe, headers as llhttp read them) to a `method` request: the one the full path's
    aiohttp response would have. Pure, so an answer seen before is answered from its KnownHead."""
    empty = must_be_empty_body(method, status)
    no_length = empty and should_remove_content_length(method, status)
    lines, first = forwarding.downstream_response_lines(headers, _ALSO_DROPPED[no_length, hsts])
    # Read from all of the registry's headers, as the full path reads them (`first` leaves out
    # what its Connection header names).
    digest = first_header(headers, b"docker-content-digest")
    content_type = first_header(headers, b"content-type")
    lines.insert(0, b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("utf-8")))
    if _API_VERSION_NAME not in first:
        lines.append(_API_VERSION_LINE)
    chunked = not empty and b"content-length" not in first
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if not empty and first.get(b"content-length") != b"0" and b"content-type" not in first:
        lines.append(b"Content-Type: application/octet-stream\r\n")
    return AnswerHead(
        method,
        hsts,
        b"".join(lines),
        digest,
        answers.needs_own_error_body(status, content_type or ""),
        empty,
        chunked,
        b"date" not in first,
    )


def render_response(response: web.Response, head_only: bool, extra: list[tuple[str, str]]) -> bytes:
    """An answer the gateway makes (built by errors.error_response) as the bytes aiohttp would
    send for it."""
    body = response.body if isinstance(response.body, bytes) else b""
    replaced = {name.lower() for name, _ in extra} | {"content-length", "transfer-encoding"}
    lines = [f"HTTP/1.1 {response.status} {response.reason}\r\n"]
    for name, value in response.headers.items():
        if name.lower() not in replaced:
            lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n")
    if "Date" not in response.headers:
        lines.append(f"Date: {rfc822_formatted_time()}\r\n")
    lines += [f"{name}: {value}\r\n" for name, value in extra]
    lines.append("\r\n")
    head = "".join(lines).encode("utf-8")
    return head if head_only else head + body


def _chunk_frame(chunk: bytes | memoryview) -> tuple[bytes, bytes | memoryview, bytes]:
    """A piece of a body in chunked encoding."""
    return b"%x\r\n" % len(chunk), chunk, b"\r\n"


class FastPathConnection(asyncio.Protocol):
    """One client connection, while its requests are plain (see the module's docstring)."""

    def __init__(
        self,
        gateway: Application,
        limits: ConnectionLimits,
        manager: web.Server,
        hand_off: Callable[[asyncio.Transport, bytes, float | None, bool], None],
        sections: Sections,
    ) -> None:
        self._gateway = gateway
        self._sections = sections
        self._limits = limits
        self._manager = manager
        self._hand_off_to = hand_off
        # Made in the loop (a protocol factory); kept because asyncio.get_running_loop() is a
        # getpid() system call on every use in CPython 3.11 (several per request otherwise).
        self._loop = asyncio.get_running_loop()
        settings = gateway.settings
        self._max_line = settings.max_header_size
        self._max_head = limits.max_head_size
        self._keepalive = settings.keepalive_timeout
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._remote = ""
        self._scheme = "http"
        self._counted = False
        self._busy = False
        self._closing = False  # shutting down: close after the request in flight
        self._reading_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None  # a client not reading its answers
        self._idle_since = 0.0
        self._head_started = 0.0  # loop time the head under way began (its deadline counts from)
        self._taken = False  # a head has been taken here (later heads are due from their first byte)
        self._task: asyncio.Task[None] | None = None
        # What aiohttp's Server.connection_lost waits for before it forgets a connection.
        self._task_handler: asyncio.Future[None] | None = None
        # The registry exchange under way without a task (UpstreamPool.send_at_once), and whether
        # shutdown gave up on it.
        self._exchange: PendingExchange | None = None
        self._cancelled = False
        self._open_record: AuditRecord | None = None  # of the request under way, until written
        self._done: asyncio.Future[None] | None = None
        self._memo = gateway.new_memo()
        # The header lines of our own on every forwarded answer, made once.
        self._own_lines = b"".join(f"{name}: {value}\r\n".encode() for name, value in self._extra_headers())
        self._closing_lines = self._own_lines + b"Connection: close\r\n"

    # --- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self._limits
        if not limits.admit(transport):
            return
        self._counted = True
        self._transport = transport  # type: ignore[assignment]
        self._manager.connection_made(self, transport)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) and peer else ""
        self._scheme = "https" if transport.get_extra_info("sslcontext") is not None else "http"
        # The first head is due from the moment the connection opens (slowloris).
        loop = self._loop
        self._head_started = loop.time()
        if limits.header_timeout:
            self._head_timer = loop.call_later(limits.header_timeout, self._head_timed_out)
        else:
            self._idle()  # no head deadline: closed when idle for keepalive_timeout, as aiohttp does

    def resume(self, transport: asyncio.Transport, data: bytes, head_started: float) -> None:
        """Take a connection back from the full path (gateway.http.server) between requests, with the
        first bytes of the next one (if any came; due from `head_started`, loop time); the
        connection is counted already."""
        self._counted = True
        self._transport = transport
        self._manager.connection_made(self, transport)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) and peer else ""
        self._scheme = "https" if transport.get_extra_info("sslcontext") is not None else "http"
        self._taken = True
        self._head_started = head_started  # not reset by data_received: the bytes go in directly
        self._gateway.metrics.fast_taken_back += 1
        if data:
            self._buffer += data
            self._next()
        else:
            self._idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self._disarm()
        self._transport = None
        self._limits.closed()
        if self._exchange is not None and self._task_handler is None:
            # aiohttp's Server keeps the connection in its list (for shutdown) until its handler
            # is done: an exchange without a task has this future instead.
            if self._done is None:
                self._done = self._loop.create_future()
            self._task_handler = self._done
        self._manager.connection_lost(self, exc)  # type: ignore[arg-type]
        self._wake_writer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()
        if self._stall_timer is not None:
            # The client reads again: the next request, held back meanwhile, is taken now.
            self._stall_timer.cancel()
            self._stall_timer = None
            if not self._busy:
                self._next()
                self._read_more_if_room()

    def _wake_writer(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _idle(self) -> None:
        """Idle from now on: closed after keepalive_timeout unless a request comes. One timer for
        many requests (not one per request), checked when it fires and re-armed for what is left."""
        loop = self._loop
        self._idle_since = loop.time()
        if self._idle_timer is None:
            self._idle_timer = loop.call_at(self._idle_since + self._keepalive, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._transport is None or self._busy:
            return  # re-armed when the request in flight is answered
        loop = self._loop
        deadline = self._idle_since + self._keepalive
        if loop.time() >= deadline:
            self._transport.close()
        else:
            self._idle_timer = loop.call_at(deadline, self._idle_check)

    def _stalled(self) -> None:
        self._stall_timer = None
        log.info(
            "client took no answer bytes for %gs with a request waiting: cut off",
            self._gateway.settings.body_timeout,
        )
        if self._transport is not None:
            self._transport.abort()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.info("closed a connection whose request head did not arrive in %ss", self._limits.header_timeout)
        if self._transport is not None:
            self._transport.abort()

    # --- aiohttp's shutdown (web.Server keeps every connection's handler) ---------------------

    def close(self) -> None:
        """Stop taking requests; close once the one in flight is answered."""
        self._closing = True
        if not self._busy and self._transport is not None:
            self._transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        self._closing = True
        if self._busy and self._done is None:
            self._done = self._loop.create_future()
        if self._busy and self._done is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._done), timeout)
            except TimeoutError:
                exchange = self._exchange
                if exchange is not None:  # without a task: its callback answers the cancellation
                    self._cancelled = True
                    exchange.cancel()
                task = self._task
                if task is not None:
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        current = asyncio.current_task()
                        if current is not None and current.cancelling():
                            raise  # shutdown itself is cancelled, not only the request
        if self._transport is not None:
            self._transport.close()

    # --- requests ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._buffer and self._taken:
            self._head_started = self._loop.time()  # a later head starts now
        self._buffer += data
        if self._busy or self._write_paused:
            # Pipelined: the next head waits for this answer (or for the client to read the last
            # ones); a flood of it stops reading until what is here is down to one head's worth.
            if len(self._buffer) > self._max_head and not self._reading_paused and self._transport:
                self._transport.pause_reading()
                self._reading_paused = True
            if self._busy:
                return
        self._next()

    def _next(self) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        buffer = self._buffer
        if not buffer:
            return
        if self._write_paused:
            # The client does not read its answers: answers must not pile up here (a client
            # pipelining requests it never reads would fill the gateway's memory). The next head
            # waits until it reads, for at most body_timeout, the time it has for each chunk.
            if self._stall_timer is None:
                self._stall_timer = self._loop.call_later(self._gateway.settings.body_timeout, self._stalled)
            return
        if self._head_timer is not None:  # the first head has come (the idle timer checks itself)
            self._head_timer.cancel()
            self._head_timer = None
        end = buffer.find(b"\r\n\r\n", 0, self._max_head)
        if end < 0:
            self._hand_off()
            return
        head = bytes(buffer[: end + 4])
        known = self._sections.get(self._remote, self._scheme, head[head.find(b"\r\n") :])
        try:
            parsed = parse_head(head, self._max_line, self._max_line, known)
            forward = (
                self._gateway.allowed_outright(parsed, self._remote, self._scheme, self._memo)
                if parsed is not None
                else None
            )
        except Exception:
            # A fault of ours must not cost the request: the full path answers it (a 500 there).
            log.exception("fast path failed on a request head; handed to the full path")
            parsed = forward = None
        if parsed is None or forward is None:
            self._hand_off()
            return
        if parsed.section is known:
            self._gateway.metrics.fast_section_reused += 1
        elif self._sections.keep(self._remote, self._scheme, parsed.section):
            # What this connection remembers, this head's identity among it (checked on every use).
            parsed.section.memo = replace(self._memo)
        del buffer[: end + 4]
        loop = self._loop
        if buffer:
            self._head_started = loop.time()  # a pipelined head: due from now, as on the full path
        self._busy = True
        self._taken = True
        if not parsed.keep_alive:
            self._closing = True  # answered with `Connection: close`, then closed, as aiohttp does
        self._serve(parsed, forward)

    def _hand_off(self) -> None:
        """The rest of this connection is aiohttp's, starting with every byte not yet answered."""
        transport = self._transport
        if transport is None:
            return
        self._disarm()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection from %s handed to the full path", self._remote)
        self._gateway.metrics.fast_handed_off += 1
        header_timeout = self._limits.header_timeout
        # The head under way keeps the deadline it has had since its first byte (or, the first
        # head, since the connection opened), not a new one.
        deadline = self._head_started + header_timeout if header_timeout else None
        data = bytes(self._buffer)
        self._buffer.clear()
        self._counted = False  # the handler counts the connection from now on
        self._transport = None
        self._manager.connection_lost(self, None)  # type: ignore[arg-type]
        if self._reading_paused:
            transport.resume_reading()
        self._hand_off_to(transport, data, deadline, self._write_paused)

    def _serve(self, head: ParsedHead, forward: Forward) -> None:
        """Forward an allowed request. Most are answered without a task: the head goes out on a
        pooled registry connection at once, and the answer head is written from its callback
        (_answered); a task waits where waiting is needed (no idle connection or slot, a body to
        stream, an error body to read)."""
        gateway = self._gateway
        metrics = gateway.metrics
        operation = forward.operation
        record = new_record(self._remote, head.method, head.target)
        record.client = forward.view.address
        record.user = forward.user
        record.operation = operation_name(operation)
        record.repository = operation.repository
        record.reference = operation.reference
        record.rule = forward.rule
        record.decision = "allow"
        metrics.in_flight += 1
        metrics.fast_served += 1
        started = time.monotonic()
        self._open_record = record
        pool = gateway.upstream
        if pool is not None:
            try:
                self._exchange = pool.send_at_once(
                    head.method,
                    self._request_head(head, forward),
                    lambda answer: self._answered(answer, head, forward, record, started),
                )
            except Exception:  # a fault of ours: the task answers it (a 500, recorded) if it is one again
                log.exception("sending %s %s at once failed", head.method, record.path)
                self._exchange = None
            if self._exchange is not None:
                return
        self._start_task(head, forward, record, started)

    def _start_task(
        self,
        head: ParsedHead,
        forward: Forward,
        record: AuditRecord,
        started: float,
        answered: tuple[UpstreamResponse, AnswerHead] | None = None,
    ) -> None:
        """What must wait, in the connection's task: the whole exchange (`_proxy`), or the rest of
        an answer whose head is written (`answered`: `_respond`). Faults and cancellation are
        recorded and answered as the fast path's, and the record finished, either way."""

        async def exchange() -> None:
            try:
                if answered is None:
                    await self._proxy(head, forward, record)
                else:
                    await self._respond(*answered, head, forward, record)
            except BaseException as exc:
                self._failed(exc, head, record)
                if not isinstance(exc, Exception | asyncio.CancelledError):
                    raise
            finally:
                self._record_done(record, started)

        def ended(_: object) -> None:
            if task.cancelled() and self._open_record is record:
                # Cancelled (shutdown) before its first step: the clean-up above never ran.
                if answered is not None:
                    answered[0].release()
                self._failed(asyncio.CancelledError(), head, record)
                self._record_done(record, started)

        task = self._loop.create_task(exchange())
        self._task = self._task_handler = task
        task.add_done_callback(ended)

    def _answered(
        self,
        answer: UpstreamResponse | UpstreamError,
        head: ParsedHead,
        forward: Forward,
        record: AuditRecord,
        started: float,
    ) -> None:
        """The registry's answer head (or failure) to a request send_at_once sent."""
        self._exchange = None
        try:
            if self._cancelled:
                raise asyncio.CancelledError
            if isinstance(answer, UpstreamError):
                self._upstream_failed(answer, head, record)
            else:
                self._gateway.metrics.observe_upstream(
                    record.operation or "other", time.monotonic() - started
                )
                rest = self._answer_head(answer, head, record)
                # A body still to come, or an error body to read: in a task.
                if rest is not None and (rest.own_error_body or not self._whole_body(answer, rest, record)):
                    self._start_task(head, forward, record, started, (answer, rest))
                    return
        except (Exception, asyncio.CancelledError) as exc:  # as the task's: recorded, answered
            if isinstance(answer, UpstreamResponse):
                answer.release()
            self._failed(exc, head, record)
        self._record_done(record, started)

    def _whole_body(self, upstream: UpstreamResponse, answer: AnswerHead, record: AuditRecord) -> bool:
        """Write the body from the answer head's callback when all of it came with the head and
        is small (a manifest, a config: a task and its waits saved), as _stream_body would.
        False: some is still to come, or it is large, for _stream_body."""
        chunks = upstream.whole_body()
        if chunks is None:
            return False
        upstream.release()
        transport = self._transport
        if transport is None or transport.is_closing():
            record.decision, record.status = "error", 0  # the client went away
            return True
        record.bytes_out += sum(len(chunk) for chunk in chunks)
        if answer.chunked:  # framed piece by piece, as _stream_body and the full path do
            framed: list[bytes | memoryview] = []
            for chunk in chunks:
                framed += _chunk_frame(chunk)
            framed.append(b"0\r\n\r\n")
            transport.writelines(framed)
        else:
            transport.writelines(chunks)
        return True

    async def _proxy(self, head: ParsedHead, forward: Forward, record: AuditRecord) -> None:
        """The request, when it could not be sent at once: waiting for a registry connection."""
        pool = self._gateway.upstream
        if pool is None:  # only before start-up or after shutdown
            record.decision = "error"
            self._answer(
                record,
                error_response(503, "UNAVAILABLE", "the gateway is not running"),
                head.method == "HEAD",
            )
            return
        upstream_started = time.monotonic()
        try:
            upstream = await pool.request(head.method, self._request_head(head, forward))
        except UpstreamError as exc:
            self._upstream_failed(exc, head, record)
            return
        self._gateway.metrics.observe_upstream(
            record.operation or "other", time.monotonic() - upstream_started
        )
        rest = self._answer_head(upstream, head, record)
        if rest is not None:
            await self._respond(upstream, rest, head, forward, record)

    def _failed(self, exc: BaseException, head: ParsedHead, record: AuditRecord) -> None:
        """What a fault or a cancellation costs the exchange: recorded, and the client answered
        (500) or, the answer under way, cut."""
        if isinstance(exc, asyncio.CancelledError):
            record.decision, record.status = "error", 0  # as on the full path: no answer came
            if self._transport is not None:
                self._transport.abort()
            return
        if not isinstance(exc, Exception):
            return
        log.error("internal error handling %s %s", head.method, record.path, exc_info=exc)
        record.decision = "error"
        if record.status == 0 and self._transport is not None:
            response = error_response(500, "UNKNOWN", "internal gateway error")
            self._answer(record, response, head.method == "HEAD")
        else:
            record.status = 0  # the answer was under way: cut, as on the full path
            if self._transport is not None:
                self._transport.abort()

    def _record_done(self, record: AuditRecord, started: float) -> None:
        self._open_record = None
        self._gateway.finish_record(record, started)
        self._finished()

    def _finished(self) -> None:
        self._busy = False
        self._task = self._task_handler = None
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        transport = self._transport
        if transport is None:
            return
        if self._closing:
            transport.close()
            return
        if self._buffer:
            self._next()
        else:
            self._idle()
        self._read_more_if_room()

    def _read_more_if_room(self) -> None:
        """Reading stopped for a flood of pipelined requests resumes once what is left of them is
        down to one head's worth (resuming sooner lets in a whole read per request answered)."""
        if self._reading_paused and self._transport is not None and len(self._buffer) <= self._max_head:
            self._reading_paused = False
            self._transport.resume_reading()

    def _extra_headers(self) -> list[tuple[str, str]]:
        return self._gateway.own_headers(self._closing)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _write(self, data: bytes) -> bool:
        """Send data, if the client is still there to take it."""
        if self._transport is None or self._transport.is_closing():
            return False
        self._transport.write(data)
        return True

    def _answer(self, record: AuditRecord, response: web.Response, head_only: bool) -> None:
        record.status = response.status
        if not head_only and isinstance(response.body, bytes):
            record.bytes_out = len(response.body)
        self._write(render_response(response, head_only, self._extra_headers()))

    def _request_head(self, head: ParsedHead, forward: Forward) -> bytes:
        section = head.section
        header_lines = section.upstream_lines
        if header_lines is None:  # once per section (see Section)
            header_lines = forwarding.upstream_header_lines(head.raw_headers, forward.view)
            section.upstream_lines = header_lines
        return forwarding.upstream_head(
            head.method, forward.operation.target, header_lines, forward.authorization
        )

    def _upstream_failed(self, exc: UpstreamError, head: ParsedHead, record: AuditRecord) -> None:
        record.decision = "error"
        response = answers.upstream_failed(
            exc, head.method, record.path, self._gateway.settings.connect_timeout
        )
        self._answer(record, response, head.method == "HEAD")

    def _answer_head(
        self, upstream: UpstreamResponse, head: ParsedHead, record: AuditRecord
    ) -> AnswerHead | None:
        """Write the client's answer head for the registry's. None: the answer is whole, and the
        registry connection released; else the rest (a body to stream, or an error body of the
        gateway's own to make) is _respond's, with the connection still held."""
        done = True
        try:
            gateway = self._gateway
            status = upstream.status
            hsts = gateway.hsts is not None
            known = upstream.known
            answer = known.downstream.get(head.method) if known is not None else None
            if isinstance(answer, AnswerHead) and answer.hsts is hsts:  # kept by method
                gateway.metrics.fast_answer_reused += 1
            else:
                answer = answer_head(head.method, status, upstream.reason, upstream.raw_headers, hsts)
                if known is not None:  # the same head again (KnownHead) is answered the same way
                    known.downstream[head.method] = answer
            record.digest = answer.digest
            if answer.own_error_body:
                done = False
                return answer
            own = self._closing_lines if self._closing else self._own_lines
            if answer.add_date:
                date = b"Date: %s\r\n" % rfc822_formatted_time().encode()
                written = self._write(b"".join((answer.lines, date, own, b"\r\n")))
            else:
                written = self._write(b"".join((answer.lines, own, b"\r\n")))
            if not written:
                record.decision = "error"  # the client is gone: recorded as the full path does
                return None
            record.status = status
            if answer.empty:
                return None
            done = False
            return answer
        finally:
            if done:
                upstream.release()

    async def _respond(
        self,
        upstream: UpstreamResponse,
        answer: AnswerHead,
        head: ParsedHead,
        forward: Forward,
        record: AuditRecord,
    ) -> None:
        """The rest of an answer _answer_head began: the body, or an error body of our own."""
        head_only = head.method == "HEAD"
        try:
            if not answer.own_error_body:
                await self._stream_body(upstream, record, answer.chunked, head.method, record.path)
                return
            original = b""
            if not head_only:
                with contextlib.suppress(UpstreamError):
                    original = await upstream.read_at_most(answers.UPSTREAM_ERROR_LOG_BYTES)
            upstream.release()
            pool = self._gateway.upstream
            if (
                upstream.status == 500
                and pool is not None
                and await answers.is_plain_blob(pool, forward.view, forward.authorization, forward.operation)
            ):
                response = error_response(
                    404, "MANIFEST_UNKNOWN", "manifest unknown: the digest names a blob"
                )
            else:
                response = answers.replace_error(head.method, record.path, upstream, original)
            self._answer(record, response, head_only)
        finally:
            upstream.release()

    async def _stream_body(
        self, upstream: UpstreamResponse, record: AuditRecord, chunked: bool, method: str, path: str
    ) -> None:
        transport = self._transport

        def send(chunk: bytes | memoryview) -> asyncio.Future[None] | None:
            if transport is None or transport.is_closing():
                raise ClientGone  # the registry connection is then closed, not reused
            if chunked:
                transport.writelines(_chunk_frame(chunk))
            else:
                transport.write(chunk)
            if not self._write_paused:
                return None
            self._drained = self._loop.create_future()
            return self._drained

        try:
            await relay(
                upstream, send, self._abort, record, self._gateway.settings.body_timeout, method, path
            )
        except (ClientGone, Cut):
            record.decision, record.status = "error", 0
            return
        if chunked and not self._write(b"0\r\n\r\n"):
            record.decision, record.status = "error", 0
