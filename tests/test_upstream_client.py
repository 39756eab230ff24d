"""The registry client (gateway/http/upstream.py) against a scripted registry on a raw socket.

Distribution never sends most of this (interim answers, bodies delimited by the end of the
connection, bytes after a complete answer), so the real registry cannot prove how the client
takes them; a socket that writes exactly the bytes under test can. What goes to the client after
these answers is covered through the gateway against the real registry elsewhere (test_proxy,
test_fastpath); here the question is what the client makes of a registry's bytes."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop
from yarl import URL

from gateway.http import upstream
from gateway.http.upstream import (
    KnownHead,
    NoConnection,
    PendingExchange,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    _Slots,
)
from tests.ldap_server import make_ca_and_server_cert

# One answer per request, each a sequence of writes (a pause between them puts them in separate
# reads on our side), and whether the registry closes the connection after it.
Writes = Sequence[bytes]


@dataclass
class Answer:
    writes: Writes
    close_after: bool = False


@dataclass
class ScriptedRegistry:
    """Answers the n-th request it reads (over all connections) with answers[n]."""

    answers: list[Answer]
    tls: ssl.SSLContext | None = None
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> URL:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"{'https' if self.tls else 'http'}://127.0.0.1:{port}")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for writer in self._writers:
            writer.close()  # the handlers see the end of their connection and return
        await asyncio.gather(*self._handlers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(head)
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                answer = self.answers[len(self.requests) - 1]
                for i, piece in enumerate(answer.writes):
                    if i:
                        await asyncio.sleep(0.05)
                    writer.write(piece)
                    await writer.drain()
                if answer.close_after:
                    return
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _head(method: str, length: int | None = None) -> bytes:
    extra = f"Content-Length: {length}\r\n" if length is not None else ""
    return f"{method} /v2/ HTTP/1.1\r\nHost: registry\r\n{extra}\r\n".encode()


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _read_all(pool: UpstreamPool, method: str, body: bytes | None = None) -> tuple[int, bytes]:
    response = await pool.request(
        method,
        _head(method, len(body) if body is not None else None),
        _body(body) if body is not None else None,
    )
    async with response:
        data = b""
        while chunk := await response.read():
            data += chunk
        return response.status, data


async def _with_registry(
    answers: list[Answer], read_timeout: float = 5.0, pki: Path | None = None
) -> tuple[ScriptedRegistry, UpstreamPool]:
    """The scripted registry and a pool for it; over TLS with a CA and certificate made in `pki`."""
    server_tls = client_tls = None
    if pki is not None:
        ca, cert, key = make_ca_and_server_cert(pki)
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, key)
        client_tls = ssl.create_default_context(cafile=str(ca))
    registry = ScriptedRegistry(answers, server_tls)
    url = await registry.start()
    pool = UpstreamPool(url, limit=4, connect_timeout=2.0, read_timeout=read_timeout, ssl_context=client_tls)
    return registry, pool


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    ("method", "writes", "status", "body"),
    [
        # An interim answer, then the real one: in one read and in two.
        ("GET", [b"HTTP/1.1 100 Continue\r\n\r\n" + OK], 200, b"ok"),
        ("GET", [b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", OK], 200, b"ok"),
        ("HEAD", [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"], 200, b""),
        (
            "HEAD",
            [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"],
            200,
            b"",
        ),
        (
            "HEAD",
            [b"HTTP/1.1 100 Continue\r\n\r\n" * 5000 + b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"],
            200,
            b"",
        ),
        # A HEAD answer announces a body it does not send; its head may come in pieces.
        ("HEAD", [b"HTTP/1.1 200 OK\r\nContent-Len", b"gth: 1234\r\n\r", b"\n"], 200, b""),
        # Chunked, split across reads.
        (
            "GET",
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab", b"c\r\n0\r\n\r\n"],
            200,
            b"abc",
        ),
        # A body of a declared length is counted, not parsed: the head and the body in pieces, the
        # head ending at a read's end, a length of 0.
        ("GET", [b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 5\r\n\r\nab", b"c", b"de"], 200, b"abcde"),
        ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", b"abc"], 200, b"abc"),
        ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r", b"\nabc"], 200, b"abc"),
        ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], 200, b""),
        ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"z" * 300_000], 200, b"z" * 300_000),
        # 204 and 304 have no body whatever they announce.
        ("GET", [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"], 304, b""),
        ("GET", [b"HTTP/1.1 204 No Content\r\n\r\n"], 204, b""),
    ],
)
async def test_answers_are_read_as_http_frames_them(
    method: str, writes: list[bytes], status: int, body: bytes
) -> None:
    registry, pool = await _with_registry([Answer(writes), Answer([OK])])
    try:
        assert await asyncio.wait_for(_read_all(pool, method), 3) == (status, body)
        # The connection carries the next exchange correctly (or was replaced, never confused).
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
    finally:
        await pool.close()
        await registry.stop()


async def test_a_body_delimited_by_the_end_of_the_connection_is_read_to_its_end() -> None:
    piece = b"x" * 100_000
    registry, pool = await _with_registry(
        [
            Answer([b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + piece, piece], close_after=True),
            Answer([OK]),
        ]
    )
    try:
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, piece * 2)
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        assert registry.connections == 2
    finally:
        await pool.close()
        await registry.stop()


async def test_bytes_after_a_complete_answer_are_never_taken_as_its_body() -> None:
    """A registry (or something posing as one) that sends more than its answer: the extra bytes
    are not part of this answer nor the start of the next one; the connection is dropped."""
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
    registry, pool = await _with_registry(
        [
            Answer([OK + smuggled]),
            Answer([OK]),
            Answer([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + b"junk"]),
        ]
    )
    try:
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        assert registry.connections == 2  # the first one was not reused
        # HEAD: whatever follows the head is not kept for the next exchange either.
        assert await asyncio.wait_for(_read_all(pool, "HEAD"), 3) == (200, b"")
    finally:
        await pool.close()
        await registry.stop()


async def test_a_body_of_declared_length_ends_where_it_said() -> None:
    """More bytes than the declared length, in the read that ends the body or one of their own:
    the answer is the declared bytes and its connection is dropped. Fewer, then the end of the
    connection: a failure, never a short body that looks complete."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
    registry, pool = await _with_registry(
        [
            Answer([head + b"ab", b"cdHTTP/1.1 200 OK\r\n"]),
            Answer([head + b"abcd", b"junk"]),
            Answer([OK]),
            Answer([head + b"abc"], close_after=True),
            Answer([OK]),
        ]
    )
    try:
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"abcd")
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"abcd")
        await asyncio.sleep(0.1)  # the junk reaches the idle pooled connection
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        assert registry.connections == 3  # neither connection was used again
        with pytest.raises(UpstreamError) as caught:
            await asyncio.wait_for(_read_all(pool, "GET"), 3)
        assert not isinstance(caught.value, UpstreamTimeout)
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
    finally:
        await pool.close()
        await registry.stop()


async def test_a_long_body_is_read_into_blocks_never_over_a_piece_still_held() -> None:
    """A long body of a declared length comes as views of blocks (_BlockReader). A block is read
    into again only when no view of it is left: pieces a caller (or a transport that has not sent
    them yet) still holds keep their bytes; the blocks are reused once they are let go, so a
    long body takes a few of them; the connection carries the next exchange after it."""
    await _long_body_in_blocks(None)


@pytest.mark.parametrize("tls", [False, True])
def test_a_long_body_is_read_into_blocks_on_uvloop_and_over_tls(tmp_path: Path, tls: bool) -> None:
    """uvloop chooses how to read when reading starts, asyncio's loop as the protocol is set, and
    each has its own TLS transport: the switch to blocks and back works on all of them (the
    gateway runs on uvloop when it is installed, and may reach the registry over TLS)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_long_body_in_blocks(tmp_path if tls else None))


async def test_a_long_body_is_read_into_blocks_over_tls(tmp_path: Path) -> None:
    await _long_body_in_blocks(tmp_path)


async def _long_body_in_blocks(pki: Path | None) -> None:
    size = 24 * 1024 * 1024 + 5
    body = bytes(range(251)) * (size // 251) + bytes(size % 251)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    registry, pool = await _with_registry(
        [Answer([head + body[:1000], body[1000 : size // 2], body[size // 2 :]]), Answer([OK])], pki=pki
    )
    try:
        response = await pool.request("GET", _head("GET"))
        held: list[tuple[memoryview, bytes]] = []
        blocks: set[int] = set()
        received = 0
        async with response:
            while chunk := await asyncio.wait_for(response.read_chunk(), 3):
                assert chunk == body[received : received + len(chunk)]
                received += len(chunk)
                if isinstance(chunk, memoryview):
                    blocks.add(id(chunk.obj))
                    if len(held) < 8 and received % 3 == 0:
                        held.append((chunk, bytes(chunk)))
                await asyncio.sleep(0)
        assert received == size
        assert held, "no piece came as a view of a block"
        assert all(view == copy for view, copy in held)  # never read over
        assert len(blocks) <= 12  # reused: 24 MiB would take 24 blocks of 1 MiB
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        assert registry.connections == 1
    finally:
        await pool.close()
        await registry.stop()


async def test_a_long_body_that_ends_short_or_runs_over_is_not_taken_whole() -> None:
    await _long_body_short_or_over(None)


@pytest.mark.parametrize("tls", [False, True])
def test_a_long_body_that_runs_over_is_cut_on_uvloop_and_over_tls(tmp_path: Path, tls: bool) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_long_body_short_or_over(tmp_path if tls else None))


async def _long_body_short_or_over(pki: Path | None) -> None:
    """A long body (read into blocks) that ends short is a failure. One followed by a forged
    answer in the same write ends where it said, and its connection is not used again: the next
    request, sent at once (no pause for the forged bytes to be noticed on their own), gets its own
    answer, not the forged one; also when the caller reads slowly, so that reading from the
    registry is paused when the body ends."""
    long_head = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n"
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
    big = 3 * 1024 * 1024
    registry, pool = await _with_registry(
        [
            Answer([long_head + b"a" * 1000, b"b" * 100_000], close_after=True),
            Answer([long_head, b"c" * 200_000, b"d" * 100_000 + forged]),
            Answer([OK]),
            Answer([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big + b"e" * big + forged]),
            Answer([OK]),
        ],
        pki=pki,
    )
    try:
        with pytest.raises(UpstreamError) as caught:
            await asyncio.wait_for(_read_all(pool, "GET"), 3)
        assert not isinstance(caught.value, UpstreamTimeout)
        # No task between the end of one exchange and the start of the next (wait_for would
        # make one, giving the loop a turn to notice the forged bytes on their own).
        async with asyncio.timeout(3):
            assert await _read_all(pool, "GET") == (200, b"c" * 200_000 + b"d" * 100_000)
            assert await _read_all(pool, "GET") == (200, b"ok")
        assert registry.connections == 3
        async with asyncio.timeout(3):
            response = await pool.request("GET", _head("GET"))
            async with response:
                received = len(await response.read())
                await asyncio.sleep(0.3)  # the registry writes it all; reading pauses at HIGH_WATER
                while chunk := await response.read_chunk():
                    received += len(chunk)
            assert received == big
            assert await _read_all(pool, "GET") == (200, b"ok")
        assert registry.connections == 4
    finally:
        await pool.close()
        await registry.stop()


async def test_a_whole_body_is_taken_at_once_only_when_small() -> None:
    """whole_body hands over a body that has come whole, when it is small (the fast path writes
    it from the head's callback); a large one, though whole, is left to read() and its waits."""
    small = b"s" * 1000
    large = b"l" * (upstream.WHOLE_BODY_MAX + 1)
    registry, pool = await _with_registry(
        [
            Answer([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(small), small)]),
            Answer([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(large), large)]),
            Answer([OK]),
        ]
    )
    try:
        async with asyncio.timeout(3):
            async with await pool.request("GET", _head("GET")) as response:
                await asyncio.sleep(0.1)  # all of it has come
                whole = response.whole_body()
                assert whole is not None and b"".join(whole) == small
                assert await response.read() == b""
            async with await pool.request("GET", _head("GET")) as response:
                await asyncio.sleep(0.1)
                assert response.whole_body() is None
                assert await response.read_at_most(len(large) + 1) == large
            assert await _read_all(pool, "GET") == (200, b"ok")
        assert registry.connections == 1
    finally:
        await pool.close()
        await registry.stop()


async def test_a_pooled_connection_closed_by_the_registry_is_replaced_for_a_bodyless_request() -> None:
    # The registry answers keep-alive, then drops the connection (an idle timeout of its own).
    registry, pool = await _with_registry([Answer([OK], close_after=True), Answer([OK])])
    try:
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        await asyncio.sleep(0.1)  # the close reaches us... or not yet: either way, one answer
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        assert registry.connections == 2
        assert len(registry.requests) == 2
    finally:
        await pool.close()
        await registry.stop()


async def test_a_request_with_a_body_is_never_sent_twice() -> None:
    # The connection is dropped without an answer after the upload: the pool must not resend it.
    registry, pool = await _with_registry([Answer([OK]), Answer([], close_after=True), Answer([OK])])
    try:
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(_read_all(pool, "PUT", b"layer"), 3)
        assert [head.split(b" ")[0] for head in registry.requests] == [b"GET", b"PUT"]
    finally:
        await pool.close()
        await registry.stop()


@pytest.mark.parametrize(
    "writes",
    [
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!"],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
        [b"SSH-2.0-OpenSSH_9.2\r\n\r\n"],
        [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"],
        # Folded, bare-LF, NUL, lone-CR and spaced header lines, a CR in the reason: never passed
        # on (they would reach the client's head as they are, or as header lines of their own).
        [b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\nok"],
        [b"HTTP/1.1 200 OK\nX-A: one\nContent-Length: 2\n\nok"],
        [b"HTTP/1.1 200 OK\r\nX-A: o\x00ne\r\nContent-Length: 2\r\n\r\nok"],
        [b"HTTP/1.1 200 OK\r\nX-A: o\rX-B: ne\r\nContent-Length: 2\r\n\r\nok"],
        [b"HTTP/1.1 200 OK\r\nX-A : one\r\nContent-Length: 2\r\n\r\nok"],
        [b"HTTP/1.1 200 O\rX-Evil: 1\r\nContent-Length: 2\r\n\r\nok"],
    ],
)
async def test_answers_that_are_not_clean_http_fail(writes: list[bytes]) -> None:
    registry, pool = await _with_registry([Answer(writes)])
    try:
        with pytest.raises(UpstreamError) as caught:
            await asyncio.wait_for(_read_all(pool, "GET"), 3)
        assert not isinstance(caught.value, UpstreamTimeout)  # refused at once, not waited out
    finally:
        await pool.close()
        await registry.stop()


async def test_a_registry_that_stops_mid_head_is_waited_for_read_timeout_only() -> None:
    registry, pool = await _with_registry([Answer([b"HTTP/1.1 200 OK\r\nContent-"])], read_timeout=0.3)
    try:
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(_read_all(pool, "GET"), 3)
    finally:
        await pool.close()
        await registry.stop()


async def test_trailer_fields_do_not_join_the_answers_headers() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: 1\r\n\r\n"
    registry, pool = await _with_registry([Answer([chunked]), Answer([OK])])
    try:
        response = await pool.request("GET", _head("GET"))
        async with response:
            assert await response.read_at_most(100) == b"ok"
            assert response.header(b"x-trailer") is None
            assert [name for name, _ in response.raw_headers] == [b"Transfer-Encoding"]
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        assert registry.connections == 1  # the connection carried the next exchange
    finally:
        await pool.close()
        await registry.stop()


@pytest.mark.parametrize(
    ("status_line", "reason"),
    [
        (b"HTTP/1.1 200 Fine By Me", "Fine By Me"),
        (b"HTTP/1.1 200 ", ""),
        # Control characters (llhttp refuses only CR and LF) and bytes beyond ASCII: the
        # standard phrase instead, on both paths (they take it from here).
        (b"HTTP/1.1 200 O\x1b[2JK", "OK"),
        (b"HTTP/1.1 404 Not\x7fFound", "Not Found"),
        (b"HTTP/1.1 200 \xe9t\xe9", "OK"),
        (b"HTTP/1.1 299 \x01", ""),
    ],
)
async def test_a_reason_phrase_that_is_not_plain_text_becomes_the_standard_one(
    status_line: bytes, reason: str
) -> None:
    registry, pool = await _with_registry([Answer([status_line + b"\r\nContent-Length: 2\r\n\r\nok"])])
    try:
        response = await pool.request("GET", _head("GET"))
        async with response:
            assert response.reason == reason
    finally:
        await pool.close()
        await registry.stop()


Parts = tuple[int, str, list[tuple[bytes, bytes]]]


async def _head_answer(pool: UpstreamPool) -> tuple[Parts, KnownHead | None]:
    """A HEAD's answer: status, reason, headers; and its KnownHead."""
    async with await pool.request("HEAD", _head("HEAD")) as response:
        return (response.status, response.reason, list(response.raw_headers)), response.known


async def test_an_answer_to_head_read_before_is_taken_as_it_was_read() -> None:
    """The same head again, from the start of an answer to HEAD, is taken as llhttp read it the
    first time (KnownHead); any other is read by llhttp: a different one, one after an interim
    answer. What follows a head still keeps its connection out of the pool; a head that closes
    the connection still closes it."""
    digest_a = b"HTTP/1.1 200 Fine\r\nContent-Length: 7\r\nDocker-Content-Digest: sha256:a\r\nDate: x\r\n\r\n"
    digest_b = digest_a.replace(b"sha256:a", b"sha256:b")
    closing = b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 3\r\n\r\n"
    registry, pool = await _with_registry(
        [
            Answer([digest_a]),
            Answer([digest_a[:20], digest_a[20:]]),  # in two reads
            Answer([digest_b]),
            Answer([b"HTTP/1.1 100 Continue\r\n\r\n" + digest_a]),
            Answer([digest_a + b"HTTP/1.1 200 OK\r\n"]),
            Answer([closing]),  # the registry says it closes, and keeps the connection open
            Answer([closing]),
            Answer([OK]),
        ]
    )
    parts_a = (
        200,
        "Fine",
        [(b"Content-Length", b"7"), (b"Docker-Content-Digest", b"sha256:a"), (b"Date", b"x")],
    )
    try:
        parts, first = await asyncio.wait_for(_head_answer(pool), 3)
        assert parts == parts_a and first is not None
        parts, again = await asyncio.wait_for(_head_answer(pool), 3)
        assert parts == parts_a and again is first
        parts, other = await asyncio.wait_for(_head_answer(pool), 3)
        assert parts[2][1] == (b"Docker-Content-Digest", b"sha256:b")
        assert other is not None and other is not first
        # After an interim answer: read by llhttp, and not kept (only a first head is).
        parts, after_interim = await asyncio.wait_for(_head_answer(pool), 3)
        assert parts == parts_a and after_interim is None
        assert registry.connections == 1
        # Taken as known, but more bytes than the head came: the connection is not reused.
        parts, known = await asyncio.wait_for(_head_answer(pool), 3)
        assert parts == parts_a and known is first
        closings = []
        for _ in range(2):  # read, then known: the connection is closed after it either way
            connections = registry.connections
            (status, _, _), closing_known = await asyncio.wait_for(_head_answer(pool), 3)
            assert status == 404 and closing_known is not None
            closings.append(closing_known)
            assert registry.connections == connections + 1  # on a new connection: the last was dropped
        assert closings[1] is closings[0]
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        assert registry.connections == 4  # the closing answer's connection was not reused
    finally:
        await pool.close()
        await registry.stop()


async def _get_answer(pool: UpstreamPool) -> tuple[int, bytes, KnownHead | None]:
    """A GET's answer: status, body, and its KnownHead."""
    async with await pool.request("GET", _head("GET")) as response:
        body = b""
        while chunk := await response.read():
            body += chunk
        return response.status, body, response.known


async def test_an_answer_to_get_read_before_is_taken_and_its_body_counted() -> None:
    """A GET's answer head seen before (from a GET or a HEAD: llhttp reads heads alone, the
    same either way) is taken as it was read when its body has a declared length, which is then
    counted as for a head just parsed: the body whole, bytes past it dropping the connection. A
    chunked head seen before is read by llhttp again."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDocker-Content-Digest: sha256:g\r\n\r\n"
    empty = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    unchanged = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    long = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    fresh = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Fresh: 1\r\n\r\n"
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\n"
    registry, pool = await _with_registry(
        [
            Answer([head]),  # to HEAD: kept
            Answer([head + b"hello"]),  # to GET: taken as known, body counted
            Answer([head, b"hel", b"lo"]),  # the body in later reads
            Answer([head + b"hellojunk"]),  # more than declared: the connection is dropped
            Answer([empty]),
            Answer([empty]),
            Answer([unchanged]),
            Answer([unchanged]),
            Answer([chunked + b"2\r\nok\r\n0\r\n\r\n"]),
            Answer([chunked + b"3\r\nyes\r\n0\r\n\r\n"]),
            Answer([b"HTTP/1.1 100 Continue\r\n\r\n" + fresh + b"new"]),
            Answer([fresh + b"new"]),
            Answer([fresh + b"new"]),
            Answer([long + b"L" * 100_000]),
            Answer([long, b"L" * 100_000]),
            Answer([closing + b"bye"], close_after=True),
            Answer([closing + b"bye"], close_after=True),
            Answer([OK]),
            Answer([OK]),
        ]
    )
    try:
        async with asyncio.timeout(5):
            (status, _, _), from_head = await _head_answer(pool)
            assert status == 200 and from_head is not None
            assert await _get_answer(pool) == (200, b"hello", from_head)
            assert await _get_answer(pool) == (200, b"hello", from_head)
            assert registry.connections == 1
            assert await _get_answer(pool) == (200, b"hello", from_head)
            await asyncio.sleep(0.1)
            status, body, known_empty = await _get_answer(pool)
            assert (status, body) == (200, b"") and registry.connections == 2
            assert known_empty is not None
            assert await _get_answer(pool) == (200, b"", known_empty)
            status, body, known_unchanged = await _get_answer(pool)
            assert (status, body) == (304, b"") and known_unchanged is not None
            assert await _get_answer(pool) == (304, b"", known_unchanged)
            # Chunked: read by llhttp each time, never kept (it could not serve a GET).
            assert await _get_answer(pool) == (200, b"ok", None)
            assert await _get_answer(pool) == (200, b"yes", None)
            # After an interim answer: read by llhttp and not kept (only a first head is); kept
            # when it comes first.
            assert await _get_answer(pool) == (200, b"new", None)
            status, body, known_fresh = await _get_answer(pool)
            assert (status, body) == (200, b"new") and known_fresh is not None
            assert await _get_answer(pool) == (200, b"new", known_fresh)
            # A long body counted from a known head: read into blocks all the same.
            status, body, known_long = await _get_answer(pool)
            assert (status, body) == (200, b"L" * 100_000) and known_long is not None
            assert await _get_answer(pool) == (200, b"L" * 100_000, known_long)
            assert registry.connections == 2
            # A known head that closes the connection closes it again.
            status, body, known_closing = await _get_answer(pool)
            assert (status, body, registry.connections) == (200, b"bye", 2)
            assert await _get_answer(pool) == (200, b"bye", known_closing)
            assert known_closing is not None and registry.connections == 3
            # An upload's answer head (an upload of its own) is not kept.
            assert await _read_all(pool, "PUT", b"layer") == (200, b"ok")
            assert OK not in pool._known_heads
            assert await _read_all(pool, "GET") == (200, b"ok")
        assert registry.connections == 4  # the last two on a new one, which was kept
    finally:
        await pool.close()
        await registry.stop()


async def test_known_heads_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "KNOWN_HEADS_MAX", 3)
    heads = [b"HTTP/1.1 200 OK\r\nX-N: %d\r\nContent-Length: 7\r\n\r\n" % n for n in range(7)]
    large = b"HTTP/1.1 200 OK\r\nX-Large: " + b"x" * upstream.KNOWN_HEAD_SIZE_MAX + b"\r\n\r\n"
    registry, pool = await _with_registry([Answer([head]) for head in [*heads, large, large]])
    try:
        for count in (1, 2, 3, 1, 2, 3, 1):  # emptied when full
            assert (await asyncio.wait_for(_head_answer(pool), 3))[1] is not None
            assert len(pool._known_heads) == count
        for _ in range(2):
            (status, _, headers), known = await asyncio.wait_for(_head_answer(pool), 3)
            assert status == 200 and known is None and len(headers[0][1]) == upstream.KNOWN_HEAD_SIZE_MAX
        assert len(pool._known_heads) == 1
    finally:
        await pool.close()
        await registry.stop()


Sent = UpstreamResponse | UpstreamError


def _never(answer: Sent) -> None:
    raise AssertionError(f"answered, though nothing was to be sent: {answer!r}")


async def _sent_at_once(pool: UpstreamPool, method: str = "GET") -> Sent | None:
    """send_at_once's answer (its callback's argument); None when it sent nothing."""
    answered: asyncio.Future[Sent] = asyncio.get_running_loop().create_future()
    if pool.send_at_once(method, _head(method), answered.set_result) is None:
        return None
    return await asyncio.wait_for(answered, 5)


async def test_a_request_goes_out_at_once_on_an_idle_pooled_connection_only() -> None:
    registry, pool = await _with_registry([Answer([OK]), Answer([OK]), Answer([OK[:-2]])])
    try:
        assert pool.send_at_once("GET", _head("GET"), _never) is None  # no connection yet
        assert registry.requests == []
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        response = await _sent_at_once(pool)
        assert isinstance(response, UpstreamResponse) and response.status == 200
        async with response:
            assert await response.read_at_most(10) == b"ok"
        head = await _sent_at_once(pool, "HEAD")
        assert isinstance(head, UpstreamResponse) and head.raw_headers == [(b"Content-Length", b"2")]
        head.release()
        assert registry.connections == 1 and len(registry.requests) == 3
    finally:
        await pool.close()
        await registry.stop()


@pytest.mark.parametrize("again", [[OK], []], ids=["answered", "dropped-again"])
async def test_a_request_sent_at_once_on_a_dropped_connection_is_sent_again_once(again: Writes) -> None:
    """The registry closes the pooled connection as the request arrives (nothing of it was
    processed): sent again, once, on a new connection, as `request` does; dropped again, a failure."""
    registry, pool = await _with_registry(
        [
            Answer([OK]),
            Answer([], close_after=True),
            Answer(again, close_after=not again),
            *[Answer([OK])] * 4,
        ]
    )
    try:
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        answer = await _sent_at_once(pool)
        if again:
            assert isinstance(answer, UpstreamResponse) and answer.status == 200
            answer.release()
        else:
            assert isinstance(answer, UpstreamError) and not isinstance(answer, UpstreamTimeout)
        assert len(registry.requests) == 3 and registry.connections == 2
        # Every slot is back: four more requests at once, the pool's limit.
        results = await asyncio.wait_for(asyncio.gather(*[_read_all(pool, "GET") for _ in range(4)]), 5)
        assert results == [(200, b"ok")] * 4
    finally:
        await pool.close()
        await registry.stop()


async def test_a_registry_quiet_after_a_request_sent_at_once_is_a_timeout_and_no_resend() -> None:
    registry, pool = await _with_registry(
        [Answer([OK]), Answer([b"HTTP/1.1 200 OK\r\nContent-"])], read_timeout=0.3
    )
    try:
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        started = asyncio.get_running_loop().time()
        answer = await _sent_at_once(pool)
        assert isinstance(answer, UpstreamTimeout)
        assert 0.25 < asyncio.get_running_loop().time() - started < 2
        assert len(registry.requests) == 2
    finally:
        await pool.close()
        await registry.stop()


async def _one_slot_exchange(
    answers: list[Answer], connect_timeout: float
) -> tuple[ScriptedRegistry, UpstreamPool, PendingExchange, asyncio.Future[Sent]]:
    """A pool of one slot, one request answered, then one sent at once (its answer to come)."""
    registry = ScriptedRegistry(answers)
    pool = UpstreamPool(await registry.start(), limit=1, connect_timeout=connect_timeout, read_timeout=30.0)
    assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
    answered: asyncio.Future[Sent] = asyncio.get_running_loop().create_future()
    exchange = pool.send_at_once("GET", _head("GET"), answered.set_result)
    assert exchange is not None
    return registry, pool, exchange, answered


async def test_an_exchange_sent_at_once_can_be_given_up() -> None:
    url_registry, pool, exchange, answered = await _one_slot_exchange(
        [Answer([OK]), Answer([]), Answer([OK])], connect_timeout=0.3
    )
    try:
        # Its slot is taken (the limit is 1): nothing else is sent at once, a request waits.
        assert pool.send_at_once("GET", _head("GET"), _never) is None
        with pytest.raises(NoConnection):
            await _read_all(pool, "GET")
        exchange.cancel()
        answer = await asyncio.wait_for(answered, 3)
        assert isinstance(answer, UpstreamError) and not isinstance(answer, UpstreamTimeout)
        # The slot is back and the connection not reused: the next request on a new one.
        assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
        assert url_registry.connections == 2 and len(url_registry.requests) == 3
    finally:
        await pool.close()
        await url_registry.stop()


async def test_slots_go_to_waiters_in_order_and_one_given_up_passes_on() -> None:
    slots = _Slots(1)
    assert slots.take_now() and not slots.take_now()
    loop = asyncio.get_running_loop()
    with pytest.raises(NoConnection):
        await slots.take(loop.time() + 0.05)
    order: list[str] = []

    async def waiter(name: str) -> None:
        await slots.take(loop.time() + 5)
        order.append(name)

    first, second = asyncio.ensure_future(waiter("first")), asyncio.ensure_future(waiter("second"))
    await asyncio.sleep(0.01)
    slots.give()  # to the first waiting
    await asyncio.sleep(0.01)
    assert order == ["first"] and not slots.take_now()
    slots.give()
    second.cancel()  # handed the slot, then cancelled before it ran: the slot is passed on
    with pytest.raises(asyncio.CancelledError):
        await second
    assert slots.take_now() and not slots.take_now()
    await first


@pytest.mark.parametrize("how", ["cancel", "pool-closed"])
async def test_a_request_sent_again_can_be_given_up(how: str) -> None:
    """Given up while it is sent again on a new connection (the pooled one was dropped): the
    caller is told at once and the slot is back, whether the exchange is cancelled or the pool
    closes."""
    registry, pool, exchange, answered = await _one_slot_exchange(
        [Answer([OK]), Answer([], close_after=True), Answer([]), Answer([OK])], connect_timeout=2.0
    )
    try:
        for _ in range(100):  # until the registry has the request sent again (and keeps it)
            if len(registry.requests) == 3:
                break
            await asyncio.sleep(0.02)
        assert len(registry.requests) == 3 and not answered.done()
        if how == "cancel":
            exchange.cancel()
        else:
            await pool.close()
        answer = await asyncio.wait_for(answered, 3)
        assert isinstance(answer, UpstreamError) and not isinstance(answer, UpstreamTimeout)
        if how == "cancel":  # the slot is back (the limit is 1)
            assert await asyncio.wait_for(_read_all(pool, "GET"), 3) == (200, b"ok")
    finally:
        await pool.close()
        await registry.stop()
