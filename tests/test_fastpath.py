# ruff: noqa: E501  (raw requests are wire bytes, easier to read unsplit)
"""The fast path (gateway.http.fastpath): which heads it takes, and that it answers exactly as the full
path does, against the real registry.

Fidelity is checked side by side: one registry, two gateways with the same users and rules, one
with `fast_path: false`; the same requests on each, and the answers (status, headers but Date,
body) and audit records (but time and duration) must be the same, while the metrics show which
path served them.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.http.fastpath import AnswerHead, ParsedHead, Section, Sections, answer_head, parse_head
from tests.conftest import Gateway, Registry, free_port, htpasswd_add, start_gateway, start_registry, stop
from tests.test_hostile import OCI_MANIFEST, auth, gateway_with_policy, push_blob, push_image

# --- which heads the fast path takes (pure) ---------------------------------------------------

PLAIN = b"GET /v2/a/manifests/1 HTTP/1.1\r\nHost: h:5000\r\nAuthorization: Basic eDp5\r\nAccept: a/b\r\nAccept: c/d\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "taken"),
    [
        (PLAIN, True),
        (PLAIN.replace(b"GET", b"HEAD", 1), True),
        (b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n", True),
        (b"GET /v2/ HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n", True),
        # bodies, or headers that could announce one or change the connection: the full path
        (PLAIN.replace(b"GET", b"POST", 1), False),
        (PLAIN.replace(b"GET", b"DELETE", 1), False),
        (PLAIN.replace(b"GET", b"OPTIONS", 1), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), True),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nTE: trailers\r\n\r\n"), False),
        # names aiohttp's parser refuses twice, or at all; blanks llhttp keeps and aiohttp strips
        (PLAIN.replace(b"\r\n\r\n", b"\r\nETag: x\r\nETag: y\r\n\r\n"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nUser-Agent: a\r\nUser-Agent: b\r\n\r\n"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Key1: x\r\n\r\n"), False),
        (PLAIN.replace(b"a/b", b"a/b "), False),
        (PLAIN.replace(b"a/b", b"a/b\t"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nX: \r\n\r\n"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nX:\r\n\r\n"), True),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nETag: x\r\n\r\n"), True),
        # versions other than 1.1
        (PLAIN.replace(b"HTTP/1.1", b"HTTP/1.0"), False),
        (PLAIN.replace(b"HTTP/1.1", b"HTTP/2.0"), False),
        # Host: none, or two; a second Authorization
        (b"GET /v2/ HTTP/1.1\r\nAccept: x\r\n\r\n", False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nHost: other\r\n\r\n"), False),
        (PLAIN.replace(b"\r\n\r\n", b"\r\nAuthorization: Basic YTpi\r\n\r\n"), False),
        # bytes that are not printable ASCII, in a value or the target
        (PLAIN.replace(b"a/b", b"a\x01b"), False),
        (PLAIN.replace(b"a/b", b"a\x7fb"), False),
        (PLAIN.replace(b"a/b", b"a\rb"), False),
        (PLAIN.replace(b"a/b", b"a\x00b"), False),
        (PLAIN.replace(b"Accept", "Accépt".encode(), 1), False),
        (PLAIN.replace(b"a/b", "é".encode()), False),
        (PLAIN.replace(b"/v2/a/", "/v2/é/".encode()), False),
        # targets that are not origin-form
        (PLAIN.replace(b"/v2/a/manifests/1", b"http://h/v2/a/manifests/1"), False),
        (PLAIN.replace(b"/v2/a/manifests/1", b"*"), False),
        # line endings and framing llhttp would read another way: never guessed at here
        (b"GET /v2/ HTTP/1.1\nHost: h\n\nGET /v2/x HTTP/1.1\r\nHost: h\r\n\r\n", False),
        (b"GET /v2/ HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", False),
        (b"GET /v2/ HTTP/1.1\r\nHost : h\r\n\r\n", False),
        (b"GET /v2/ HTTP/1.1\r\nHo\x00st: h\r\n\r\n", False),
        (b"GET  /v2/ HTTP/1.1\r\nHost: h\r\n\r\n", False),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", False),
        # over the size limits: the full path answers them (400/431)
        (b"GET /v2/" + b"a" * 200 + b" HTTP/1.1\r\nHost: h\r\n\r\n", False),
        (b"GET /v2/ HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 200 + b"\r\n\r\n", False),
        (b"GET /v2/ HTTP/1.1\r\nHost: h\r\n" + b"X: v\r\n" * 101 + b"\r\n", False),
    ],
)
def test_heads_the_fast_path_takes(head: bytes, taken: bool) -> None:
    parsed = parse_head(head, 128, 128)
    assert (parsed is not None) is taken, parsed


def test_a_taken_head_keeps_the_bytes_sent() -> None:
    parsed = parse_head(PLAIN, 16384, 16384)
    assert parsed is not None
    assert (parsed.method, parsed.target) == ("GET", "/v2/a/manifests/1")
    assert parsed.raw_headers == (
        (b"Host", b"h:5000"),
        (b"Authorization", b"Basic eDp5"),
        (b"Accept", b"a/b"),
        (b"Accept", b"c/d"),
    )
    assert parsed.headers.getall("accept") == ["a/b", "c/d"]
    assert parsed.keep_alive
    closing = parse_head(PLAIN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), 16384, 16384)
    assert closing is not None and not closing.keep_alive


def _reading(parsed: ParsedHead | None) -> object:
    """What a parse gives, to compare two: None, or every part of the head as taken."""
    if parsed is None:
        return None
    return (parsed.method, parsed.target, parsed.raw_headers, list(parsed.headers.items()), parsed.keep_alive)


SECTIONS = [
    PLAIN[PLAIN.index(b"\r\n") :],
    b"\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"\r\nHost: h\r\n\r\n",
]


def _variants(*plain: bytes) -> st.SearchStrategy[bytes]:
    """A request line part: mostly a plain spelling (so that whole lines are often plain but for one
    part), else an odd one or noise."""
    odd = [b"", b" ", b"\t", b"\n", b"\r", b"\x00", b"\x7f", "é".encode(), b"a" * 130, b"get", b"HTTP/1.1 "]
    parts = st.sampled_from([*plain] * (24 // len(plain)) + odd)
    return st.integers(0, 9).flatmap(lambda pick: st.binary(max_size=6) if pick == 0 else parts)


TARGET_PARTS = [
    b"/v2/" + b"a" * 130,  # over the line limit
    b"/v2/\x01",
    b"/v2/\x7f",
    "/v2/é".encode(),
    b"/v2/",
    b"/v2/a/manifests/1",
    b"/v2/a/tags/list?n=1",
    b"/v2/#x",
    b"/v2/%2e",
    b"/{}|\\^`",
    b'/"<>',
]
LINES = st.builds(
    lambda method, blank, target, blank2, version: method + blank + target + blank2 + version,
    _variants(b"GET", b"HEAD", b"POST"),
    _variants(b" "),
    _variants(*TARGET_PARTS, b"*", b"http://h/v2/", b"v2/"),
    _variants(b" "),
    _variants(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"),
) | st.binary(max_size=40)


@given(LINES, st.sampled_from(SECTIONS))
@settings(max_examples=3000, deadline=None)
def test_a_head_with_a_known_section_reads_as_a_full_parse_would(line: bytes, section: bytes) -> None:
    """A connection's next head with the same header section: only the request line is read, and
    the result is exactly that of a full parse (the same request, or the full path's)."""
    first = parse_head(b"GET /v2/ HTTP/1.1" + section, 128, 128)
    assert first is not None
    head = line + section
    with_section = parse_head(head, 128, 128, first.section)
    assert _reading(with_section) == _reading(parse_head(head, 128, 128))
    if with_section is not None and head.find(b"\r\n") == len(line):
        assert with_section.section is first.section  # taken over, not parsed again


def test_a_different_section_is_parsed_anew() -> None:
    first = parse_head(PLAIN, 16384, 16384)
    assert first is not None
    for other in (
        PLAIN.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),  # refused, not taken from the last
        PLAIN.replace(b"eDp5", b"eDp6"),
        PLAIN.replace(b"Host: h:5000", b"Host: h:5001"),
    ):
        again = parse_head(other, 16384, 16384, first.section)
        assert _reading(again) == _reading(parse_head(other, 16384, 16384))
        assert again is None or again.section is not first.section


def _section(text: bytes) -> Section:
    parsed = parse_head(b"GET /v2/ HTTP/1.1" + text, 16384, 16384)
    assert parsed is not None
    return parsed.section


def _seen_twice(sections: Sections, peer: str, section: Section) -> None:
    sections.keep(peer, "http", section)
    sections.keep(peer, "http", section)


def test_sections_are_kept_by_peer_scheme_and_bytes_within_bounds() -> None:
    a, b, c, d, e = (_section(f"\r\nHost: h\r\nX: {name}\r\n\r\n".encode()) for name in "abcde")
    sections = Sections(entries=4, size=1024)
    sections.keep("10.0.0.1", "http", a)
    assert sections.get("10.0.0.1", "http", a.text) is None  # seen once: only noted
    sections.keep("10.0.0.2", "http", a)  # another peer's: seen once as well
    assert sections.get("10.0.0.2", "http", a.text) is None
    sections.keep("10.0.0.1", "http", a)  # seen again: kept
    assert sections.get("10.0.0.1", "http", a.text) is a
    assert sections.get("10.0.0.1", "http", bytes(a.text)) is a  # by the bytes, not the object
    assert sections.get("10.0.0.2", "http", a.text) is None  # another peer's
    assert sections.get("10.0.0.1", "https", a.text) is None  # another scheme's
    assert sections.get("10.0.0.1", "http", b.text) is None
    for section in (b, c, d):
        _seen_twice(sections, "10.0.0.1", section)
    kept_bytes = sections._bytes
    assert kept_bytes == sum(len(x.text) for x in (a, b, c, d))
    assert not sections.keep("10.0.0.1", "http", a)  # kept already: nothing moves, nothing counted
    assert not sections.keep("10.0.0.1", "http", _section(a.text[:-4] + b"\r\n\r\n"))  # the same bytes
    assert (len(sections), sections._bytes) == (4, kept_bytes)
    _seen_twice(sections, "10.0.0.1", e)  # beyond four: the oldest go, down to three
    assert [sections.get("10.0.0.1", "http", x.text) for x in (a, b, c, d, e)] == [None, None, c, d, e]
    assert sections._bytes == sum(len(x.text) for x in (c, d, e))


def test_sections_are_bounded_in_bytes() -> None:
    small = [_section(f"\r\nHost: h\r\nX: {index}\r\n\r\n".encode()) for index in range(5)]
    size = sum(len(section.text) for section in small[:4])  # all the same length
    sections = Sections(entries=100, size=size)
    for section in small:
        _seen_twice(sections, "p", section)
    # Beyond the four that fit: the oldest go until three quarters of the bytes are left.
    assert [sections.get("p", "http", section.text) for section in small] == [None, None, *small[2:]]
    assert sections._bytes == sum(len(section.text) for section in small[2:])
    # More than three quarters of the whole: never kept, nothing dropped for it.
    large = _section(b"\r\nHost: h\r\nX: " + b"x" * (size * 3 // 4) + b"\r\n\r\n")
    assert not sections.keep("p", "http", large) and not sections.keep("p", "http", large)
    assert sections.get("p", "http", large.text) is None
    assert len(sections) == 3
    capped = Sections(entries=100, size=10_000, largest=40)
    longer = _section(b"\r\nHost: h\r\nX: " + b"x" * 40 + b"\r\n\r\n")
    assert not capped.keep("p", "http", longer) and not capped.keep("p", "http", longer)
    assert len(capped) == 0


def test_sections_seen_once_are_noted_within_bounds() -> None:
    many = [_section(f"\r\nHost: h\r\nX: {index}\r\n\r\n".encode()) for index in range(100)]
    sections = Sections(entries=4, size=10_000)
    for section in many:  # each seen once (a request id): none kept, and the notes stay bounded
        sections.keep("p", "http", section)
    assert len(sections) == 0
    assert len(sections._seen_once) <= 8 * 4
    _seen_twice(sections, "p", many[0])  # long forgotten: noted anew, then kept
    assert sections.get("p", "http", many[0].text) is many[0]
    sections.keep("p", "http", many[-1])  # noted lately: kept at its second sight
    assert sections.get("p", "http", many[-1].text) is many[-1]


_DIGEST = (b"Docker-Content-Digest", b"sha256:d")
_DATE = (b"Date", b"Wed, 02 Dec 2026 06:00:00 GMT")
_API = b"Docker-Distribution-Api-Version: registry/2.0\r\n"


@pytest.mark.parametrize(
    ("method", "status", "headers", "hsts", "expected"),
    [
        # A manifest HEAD: the length kept (no body follows), the API version added.
        (
            "HEAD",
            200,
            [(b"Content-Length", b"527"), (b"Content-Type", b"application/json"), _DIGEST, _DATE],
            False,
            AnswerHead(
                "HEAD",
                False,
                b"HTTP/1.1 200 OK\r\nContent-Length: 527\r\nContent-Type: application/json\r\n"
                b"Docker-Content-Digest: sha256:d\r\nDate: Wed, 02 Dec 2026 06:00:00 GMT\r\n" + _API,
                "sha256:d",
                False,
                True,
                False,
                False,
            ),
        ),
        # No length from the registry: chunked, and a type; no Date: the gateway adds one.
        (
            "GET",
            200,
            [(b"Docker-Distribution-Api-Version", b"registry/2.0")],
            False,
            AnswerHead(
                "GET",
                False,
                b"HTTP/1.1 200 OK\r\n" + _API + b"Transfer-Encoding: chunked\r\n"
                b"Content-Type: application/octet-stream\r\n",
                None,
                False,
                False,
                True,
                True,
            ),
        ),
        # 204 has no length to send; hop-by-hop headers, what Connection names, the registry's
        # Server and (when the gateway sends its own) HSTS are dropped.
        (
            "HEAD",
            204,
            [
                (b"Content-Length", b"0"),
                (b"Connection", b"X-Hop"),
                (b"X-Hop", b"1"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Server", b"registry"),
                (b"Strict-Transport-Security", b"max-age=1"),
                _DATE,
            ],
            True,
            AnswerHead(
                "HEAD",
                True,
                b"HTTP/1.1 204 OK\r\nDate: Wed, 02 Dec 2026 06:00:00 GMT\r\n" + _API,
                None,
                False,
                True,
                False,
                False,
            ),
        ),
        # Errors the gateway answers with a body of its own: a 5xx, a 4xx not in JSON.
        ("HEAD", 500, [(b"Content-Type", b"application/json"), _DATE], False, "own"),
        ("GET", 404, [(b"Content-Type", b"text/plain; charset=utf-8"), _DATE], False, "own"),
        ("HEAD", 404, [(b"Content-Type", b"application/json; charset=utf-8"), _DATE], False, "registry's"),
    ],
)
def test_answer_heads(
    method: str, status: int, headers: list[tuple[bytes, bytes]], hsts: bool, expected: AnswerHead | str
) -> None:
    answer = answer_head(method, status, "OK", headers, hsts)
    if isinstance(expected, str):
        assert answer.own_error_body is (expected == "own")
    else:
        assert answer == expected


# --- side by side with the full path, against the real registry ---------------------------------


@dataclass
class Pair:
    registry: Registry
    fast: Gateway
    full: Gateway
    fast_metrics: str
    full_metrics: str
    fast_audit: Path
    full_audit: Path
    layer: str
    manifest: str
    blob: str
    blob_data: bytes


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    registry = start_registry(tmp_path)
    started: list[Gateway] = []
    try:
        registry_host = registry.url.removeprefix("http://")
        layer, manifest = push_image(registry_host, "public/app", "1")
        push_image(registry_host, "secret/hidden", "1")
        blob_data = bytes(range(256)) * 4096  # 1 MiB
        blob = push_blob(registry_host, "public/app", blob_data)
        ports = free_port(), free_port()
        audits = tmp_path / "fast-audit.jsonl", tmp_path / "full-audit.jsonl"
        for fast_path, port, audit in zip(("true", "false"), ports, audits, strict=True):
            # Files of its own for each: writing one gateway's would be a reload for the other.
            directory = tmp_path / ("fast" if fast_path == "true" else "full")
            directory.mkdir()
            started.append(
                gateway_with_policy(
                    directory,
                    registry,
                    "--metrics-listen",
                    f"127.0.0.1:{port}",
                    "--audit-log",
                    str(audit),
                    env={"GATEWAY_FAST_PATH": fast_path},
                )
            )
        yield Pair(
            registry,
            started[0],
            started[1],
            f"http://127.0.0.1:{ports[0]}/metrics",
            f"http://127.0.0.1:{ports[1]}/metrics",
            audits[0],
            audits[1],
            layer,
            manifest,
            blob,
            blob_data,
        )
    finally:
        for gateway in started:
            stop(gateway.process)
        stop(registry.process)


def metered_gateway(tmp_path: Path, registry: Registry, env: dict[str, str]) -> tuple[Gateway, str]:
    """A gateway with the test policy and a metrics listener; and its /metrics URL."""
    port = free_port()
    gateway = gateway_with_policy(tmp_path, registry, "--metrics-listen", f"127.0.0.1:{port}", env=env)
    return gateway, f"http://127.0.0.1:{port}/metrics"


def fast_path_counts(metrics_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        match.group(1): float(match.group(2))
        for match in re.finditer(r'^registry_gateway_fast_path_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
    }


def cache_counts(metrics_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        match.group(1): float(match.group(2))
        for match in re.finditer(
            r'^registry_gateway_credential_cache_total\{result="(\w+)"\} (\S+)$', text, re.M
        )
    }


def read_answers(sock: socket.socket, count: int, heads_only: list[bool], timeout: float = 10) -> list[bytes]:
    """`count` whole responses from a kept-alive connection (Content-Length or chunked bodies)."""
    sock.settimeout(timeout)
    data = b""
    answers: list[bytes] = []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[: end + 4]
            rest = data[end + 4 :]
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if heads_only[len(answers)] or head.startswith((b"HTTP/1.1 204", b"HTTP/1.1 304")):
                body_end: int | None = 0
            elif length is not None:
                body_end = int(length.group(1)) if len(rest) >= int(length.group(1)) else None
            elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
                done = rest.find(b"\r\n0\r\n\r\n")
                body_end = done + 7 if done >= 0 or rest.startswith(b"0\r\n\r\n") else None
                if rest.startswith(b"0\r\n\r\n"):
                    body_end = 5
            else:
                body_end = None
            if body_end is not None:
                answers.append(head + rest[:body_end])
                data = rest[body_end:]
                continue
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return answers


def normalised(answer: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert sum(1 for line in lines if line.lower().startswith("date:")) == 1, answer
    headers = sorted(
        (name.lower(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:])
        if name.lower() != "date"
    )
    return lines[0], headers, body


def send_all(host: str, requests: list[bytes], source: str = "") -> list[bytes]:
    """Answers to `requests` on one connection (from the address `source`, when given)."""
    address, port = host.split(":")
    with socket.create_connection((address, int(port)), timeout=10, source_address=(source, 0)) as sock:
        answers = []
        for request in requests:  # one at a time: each answer is read before the next is sent
            sock.sendall(request)
            answers += read_answers(sock, 1, [request.startswith(b"HEAD")])
        return answers


def audit_records(path: Path, expected: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= expected:
            break
        time.sleep(0.05)
    records = [json.loads(line) for line in lines]
    for record in records:
        record.pop("time")
        record.pop("duration_ms")
    return records


def test_the_fast_path_answers_as_the_full_path_does(pair: Pair) -> None:
    def get(method: str, path: str, user: str | None = "reader", extra: str = "") -> bytes:
        credentials = f"Authorization: {auth(user)}\r\n" if user else ""
        return f"{method} {path} HTTP/1.1\r\nHost: registry.example:5000\r\n{credentials}{extra}\r\n".encode()

    accept = f"Accept: {OCI_MANIFEST}\r\nAccept: application/vnd.docker.distribution.manifest.v2+json\r\n"
    requests = [
        get("GET", "/v2/"),  # logs in (the full path: the first login is checked with bcrypt)
        get("GET", "/v2/"),
        get("HEAD", "/v2/"),
        get("GET", "/v2/public/app/manifests/1", extra=accept),
        get("HEAD", "/v2/public/app/manifests/1", extra=accept),
        get("GET", f"/v2/public/app/manifests/{pair.manifest}", extra=accept),
        get("GET", "/v2/public/app/manifests/missing", extra=accept),
        get("HEAD", "/v2/public/app/manifests/missing", extra=accept),
        get("GET", f"/v2/public/app/blobs/{pair.layer}"),
        get("HEAD", f"/v2/public/app/blobs/{pair.blob}"),
        get("GET", f"/v2/public/app/blobs/{pair.blob}"),
        get("GET", f"/v2/public/app/blobs/{pair.blob}", extra="Range: bytes=10-99\r\n"),
        get("GET", "/v2/public/app/blobs/sha256:" + "0" * 64),
        # Go answers 416 in plain text: the body replaced, the registry's Date kept
        get("GET", f"/v2/public/app/blobs/{pair.blob}", extra="Range: bytes=99999999-\r\n"),
        get("GET", f"/v2/public/app/manifests/{pair.layer}", extra=accept),  # registry 500 -> 404
        get("HEAD", f"/v2/public/app/manifests/{pair.layer}", extra=accept),
        get("GET", "/v2/public/app/tags/list"),
        get("GET", "/v2/public/app/tags/list?n=1"),
        get("GET", "/v2/public/app/manifests/1", user=None, extra=accept),  # anonymous, allowed by the ACL
        get("GET", "/v2/secret/hidden/manifests/1", user="alice", extra=accept),  # a challenge or 403
        get("GET", "/v2/alice/x/manifests/1", extra=accept),  # reader pulls anywhere: 404
        get("GET", "/v2/secret/hidden/manifests/1", user=None, extra=accept),  # anonymous: challenged
        get("GET", "/v2/_catalog"),  # filtered by the ACL
        get("GET", "/v2/public/app/nonsense"),
        get("GET", "/v2/public/app/manifests/1", extra="User-Agent: containerd/1.7\r\n" + accept),
        # as skopeo and podman send every request: answered, then the connection closed (so last)
        get("HEAD", f"/v2/public/app/blobs/{pair.blob}", extra="Connection: close\r\n"),
    ]
    # One connection per request, and all on one kept-alive connection.
    fast_each = [send_all(pair.fast.host, [request])[0] for request in requests]
    full_each = [send_all(pair.full.host, [request])[0] for request in requests]
    fast_kept = send_all(pair.fast.host, requests)
    full_kept = send_all(pair.full.host, requests)
    for index, request in enumerate(requests):
        for fast, full in ((fast_each[index], full_each[index]), (fast_kept[index], full_kept[index])):
            assert normalised(fast) == normalised(full), request
    assert b"\r\nConnection: close\r\n" in fast_kept[-1] and b"\r\nConnection: close\r\n" in fast_each[-1]
    statuses = [int(answer.split(b" ", 2)[1]) for answer in fast_kept]
    assert statuses[:6] == [200, 200, 200, 200, 200, 200], statuses
    assert statuses[6:8] == [404, 404] and statuses[11] == 206 and statuses[13] == 416
    assert statuses[14] == 404
    # Refusals are the full path's, the same on both: anonymous allowed by the ACL on public/*,
    # alice outside her repositories denied, the reader (pull everywhere) told there is no such
    # manifest, anonymous on a hidden repository challenged.
    assert statuses[18:22] == [200, 403, 404, 401], statuses
    assert b"WWW-Authenticate: Basic" in fast_kept[21] or b"Www-Authenticate: Basic" in fast_kept[21]
    assert fast_kept[10].endswith(pair.blob_data)

    # Each gateway's start-up probe (an anonymous GET /v2/), then every request twice.
    fast_records = audit_records(pair.fast_audit, 1 + 2 * len(requests))
    full_records = audit_records(pair.full_audit, 1 + 2 * len(requests))
    assert len(fast_records) == 1 + 2 * len(requests)
    assert fast_records == full_records

    # The login cache is counted alike: a lookup per Basic request, whichever path served it.
    assert cache_counts(pair.fast_metrics) == cache_counts(pair.full_metrics)
    fast_counts = fast_path_counts(pair.fast_metrics)
    full_counts = fast_path_counts(pair.full_metrics)
    assert full_counts == {
        "served": 0,
        "handed_off": 0,
        "taken_back": 0,
        "section_reused": 0,
        "answer_reused": 0,
    }
    # Every allowed GET/HEAD but the first login, on the kept-alive connection, was served on the
    # fast path until the first request it does not take; on single connections, all of them.
    assert fast_counts["served"] >= 16, fast_counts
    assert fast_counts["handed_off"] >= 6, fast_counts


def test_pipelined_requests_stay_in_order_across_the_hand_off(pair: Pair) -> None:
    warm = send_all(
        pair.fast.host, [f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('admin')}\r\n\r\n".encode()]
    )
    assert warm[0].startswith(b"HTTP/1.1 200")
    before = fast_path_counts(pair.fast_metrics)
    admin = f"Host: x\r\nAuthorization: {auth('admin')}\r\n"
    data = (
        f"GET /v2/public/app/manifests/1 HTTP/1.1\r\n{admin}Accept: {OCI_MANIFEST}\r\n\r\n"
        f"HEAD /v2/public/app/blobs/{pair.blob} HTTP/1.1\r\n{admin}\r\n"
        f"POST /v2/admin/new/blobs/uploads/ HTTP/1.1\r\n{admin}Content-Length: 0\r\n\r\n"
        f"GET /v2/public/app/manifests/1 HTTP/1.1\r\n{admin}Accept: {OCI_MANIFEST}\r\n\r\n"
    ).encode()
    address, port = pair.fast.host.split(":")
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(data)
        answers = read_answers(sock, 4, [False, True, False, False])
    assert [int(answer.split(b" ", 2)[1]) for answer in answers] == [200, 200, 202, 200], answers
    assert b"Docker-Upload-Uuid" in answers[2] or b"docker-upload-uuid" in answers[2].lower()
    after = fast_path_counts(pair.fast_metrics)
    # The two before the POST on the fast path; the POST and everything after it on the full path.
    assert after["served"] - before["served"] == 2
    assert after["handed_off"] - before["handed_off"] == 1
    uploads = pair.registry.storage / "docker/registry/v2/repositories/admin/new/_uploads"
    assert uploads.exists() and any(uploads.iterdir())


def test_a_head_that_arrives_in_pieces_is_answered(pair: Pair) -> None:
    send_all(
        pair.fast.host, [f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\n\r\n".encode()]
    )
    request = f"GET /v2/public/app/manifests/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\nAccept: {OCI_MANIFEST}\r\n\r\n".encode()
    address, port = pair.fast.host.split(":")
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(request[:30])
        time.sleep(0.3)
        sock.sendall(request[30:])
        answers = read_answers(sock, 1, [False])
    assert answers and answers[0].startswith(b"HTTP/1.1 200"), answers


def test_a_client_gone_mid_blob_leaves_the_registry_connections_usable(pair: Pair) -> None:
    big = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than any socket buffers hold
    digest = push_blob(pair.registry.url.removeprefix("http://"), "public/app", big)
    request = f"GET /v2/public/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\n\r\n".encode()
    outcomes = []
    for gateway, audit in ((pair.fast, pair.fast_audit), (pair.full, pair.full_audit)):
        send_all(gateway.host, [request])  # logs in
        address, port = gateway.host.split(":")
        for _ in range(5):
            with socket.create_connection((address, int(port)), timeout=10) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(request)
                assert sock.recv(100).startswith(b"HTTP/1.1 200")
        # Every later request gets the whole blob, on registry connections of the pool.
        for answer in send_all(gateway.host, [request] * 5):
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(big)
        records = audit_records(audit, 12)[2:7]  # after the start-up probe and the login
        outcomes.append([(record["status"], record["decision"]) for record in records])
    # A transfer the client cut is recorded alike on both paths: no status, an error.
    assert outcomes[0] == outcomes[1] == [(0, "error")] * 5, outcomes
    assert fast_path_counts(pair.fast_metrics)["served"] >= 10


def test_registry_down_is_a_clear_answer_on_the_fast_path(pair: Pair) -> None:
    request = f"GET /v2/public/app/manifests/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\nAccept: {OCI_MANIFEST}\r\n\r\n".encode()
    assert send_all(pair.fast.host, [request])[0].startswith(b"HTTP/1.1 200")
    before = fast_path_counts(pair.fast_metrics)
    stop(pair.registry.process)
    for gateway in (pair.fast, pair.full):
        answer = send_all(gateway.host, [request, request])
        status, headers, body = normalised(answer[0])
        assert status in ("HTTP/1.1 502 Bad Gateway", "HTTP/1.1 504 Gateway Timeout"), answer
        assert ("docker-distribution-api-version", "registry/2.0") in headers
        assert ("server", "registry-gateway") in headers
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        assert normalised(answer[1])[0] == status  # the connection still serves
    assert fast_path_counts(pair.fast_metrics)["served"] - before["served"] == 2


class Client:
    """Sends one request again and again: on one kept-alive connection, or (`per_request`) each
    time on a connection of its own with `Connection: close`, as skopeo and podman do (the
    identity then comes from the kept header section, fastpath.Section.memo)."""

    def __init__(self, host: str, request: bytes, per_request: bool) -> None:
        self.host = host
        self.request = (
            request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") if per_request else request
        )
        self.per_request = per_request
        self.sock: socket.socket | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.sock is not None:
            self.sock.close()

    def send(self) -> bytes:
        if self.per_request:
            return send_all(self.host, [self.request])[0]
        if self.sock is None:
            address, port = self.host.split(":")
            self.sock = socket.create_connection((address, int(port)), timeout=10)
        self.sock.sendall(self.request)
        return read_answers(self.sock, 1, [False])[0]

    def first_refusal(self, within: float = 10) -> bytes:
        """The first answer other than 200, sending the request until one comes."""
        deadline = time.monotonic() + within
        answer = b""
        while time.monotonic() < deadline:
            answer = self.send()
            if not answer.startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.1)
        return answer


@pytest.mark.parametrize("per_request", [False, True], ids=["kept-alive", "connection-per-request"])
def test_a_remembered_identity_ends_with_a_removed_user(
    pair: Pair, tmp_path: Path, per_request: bool
) -> None:
    """The identity a connection or a kept header section remembers ends with the users it was
    checked against."""
    request = f"GET /v2/public/app/manifests/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\nAccept: {OCI_MANIFEST}\r\n\r\n".encode()
    send_all(pair.fast.host, [request])  # the login, checked by the full path
    before = fast_path_counts(pair.fast_metrics)
    with Client(pair.fast.host, request, per_request) as client:
        for _ in range(5):
            assert client.send().startswith(b"HTTP/1.1 200")
        after = fast_path_counts(pair.fast_metrics)
        assert after["served"] - before["served"] == 5
        if per_request:  # the section is kept at its second sight: three were taken over
            assert after["section_reused"] - before["section_reused"] == 3
        users = tmp_path / "fast" / "htpasswd"
        users.write_text(
            "".join(line + "\n" for line in users.read_text().splitlines() if not line.startswith("reader:"))
        )
        answer = client.first_refusal()
        assert answer.startswith(b"HTTP/1.1 401"), answer


def test_fast_path_connections_close_when_idle_and_only_then(tmp_path: Path) -> None:
    registry = start_registry(tmp_path)
    gateway = None
    try:
        push_image(registry.url.removeprefix("http://"), "public/app", "1")
        gateway, metrics = metered_gateway(tmp_path, registry, {"GATEWAY_KEEPALIVE_TIMEOUT": "1"})
        request = f"GET /v2/public/app/manifests/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\nAccept: {OCI_MANIFEST}\r\n\r\n".encode()
        send_all(gateway.host, [request])  # the login, checked by the full path
        address, port = gateway.host.split(":")
        with socket.create_connection((address, int(port)), timeout=10) as sock:
            # Busy for 2.5 s, never idle for 1 s: kept open throughout.
            started = time.monotonic()
            while time.monotonic() - started < 2.5:
                sock.sendall(request)
                assert read_answers(sock, 1, [False])[0].startswith(b"HTTP/1.1 200")
                time.sleep(0.4)
            # Then idle: closed by the gateway after about a second.
            idle_from = time.monotonic()
            sock.settimeout(10)
            assert sock.recv(1) == b""
            assert time.monotonic() - idle_from < 5
        assert fast_path_counts(metrics)["served"] >= 5
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


def trickle_until_cut(sock: socket.socket, data: bytes) -> float | None:
    """Send data a byte every 0.1 s; when the gateway closed the connection (time.monotonic()), or
    None if it never did."""
    sock.setblocking(False)
    for byte in data:
        time.sleep(0.1)
        try:
            sock.send(bytes([byte]))
            if sock.recv(1024) == b"":
                return time.monotonic()
        except BlockingIOError:
            continue
        except OSError:
            return time.monotonic()
    return None


def test_a_head_handed_over_keeps_its_deadline(tmp_path: Path) -> None:
    """A slow first head is due header_timeout after the connection opened, whichever path ends
    up reading it (the hand-off does not start a new deadline)."""
    registry = start_registry(tmp_path)
    gateway = None
    try:
        gateway = gateway_with_policy(tmp_path, registry, env={"GATEWAY_HEADER_TIMEOUT": "2"})
        address, port = gateway.host.split(":")
        with socket.create_connection((address, int(port)), timeout=10) as sock:
            opened = time.monotonic()
            time.sleep(1.5)
            sock.sendall(b"G")  # the fast path hands a partial head over
            closed_at = trickle_until_cut(sock, b"ET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
            assert closed_at is not None, "the trickled head was never cut"
            assert closed_at - opened < 3.2, closed_at - opened  # 2 s from opening, not 1.5 + 2
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


@pytest.mark.parametrize("per_request", [False, True], ids=["kept-alive", "connection-per-request"])
def test_a_remembered_token_ends_with_its_revocation(tmp_path: Path, per_request: bool) -> None:
    """Tokens are remembered by a connection and a kept section too, and forgotten with any reload
    of revocations."""
    from gateway.tokens import revocations

    registry = start_registry(tmp_path)
    gateway = None
    try:
        push_image(registry.url.removeprefix("http://"), "public/app", "1")
        revoked = tmp_path / "revoked"
        gateway, metrics = metered_gateway(
            tmp_path, registry, {"GATEWAY_CHALLENGE": "bearer", "GATEWAY_TOKEN_REVOCATIONS": str(revoked)}
        )
        token_request = urllib.request.Request(
            f"{gateway.url}/token?service=registry-gateway&scope=repository:public/app:pull",
            headers={"Authorization": auth("reader")},
        )
        with urllib.request.urlopen(token_request, timeout=10) as response:
            token = json.loads(response.read())["token"]
        request = f"GET /v2/public/app/manifests/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nAccept: {OCI_MANIFEST}\r\n\r\n".encode()
        with Client(gateway.host, request, per_request) as client:
            for _ in range(4):
                assert client.send().startswith(b"HTTP/1.1 200")
            counts = fast_path_counts(metrics)
            assert counts["served"] >= 4
            if per_request:
                assert counts["section_reused"] >= 2
            time.sleep(1.1)  # the token's issue time must be before the revocation's
            revocations.revoke(revoked, "reader")
            answer = client.first_refusal()
            assert answer.startswith(b"HTTP/1.1 401"), answer
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


def test_a_head_pipelined_during_a_long_answer_is_due_from_its_own_start(tmp_path: Path) -> None:
    """A head that begins while a long first answer is still going is due header_timeout after its
    own first byte, not after the connection opened (which has passed by then)."""
    registry = start_registry(tmp_path)
    gateway = None
    try:
        big = bytes(range(256)) * (128 * 1024)  # 32 MiB
        digest = push_blob(registry.url.removeprefix("http://"), "public/app", big)
        gateway = gateway_with_policy(tmp_path, registry, env={"GATEWAY_HEADER_TIMEOUT": "2"})
        headers = f"Host: x\r\nAuthorization: {auth('reader')}\r\n"
        send_all(gateway.host, [f"GET /v2/ HTTP/1.1\r\n{headers}\r\n".encode()])  # the login
        address, port = gateway.host.split(":")
        with socket.create_connection((address, int(port)), timeout=10) as sock:
            opened = time.monotonic()
            sock.sendall(f"GET /v2/public/app/blobs/{digest} HTTP/1.1\r\n{headers}\r\n".encode())
            second = f"GET /v2/ HTTP/1.1\r\n{headers}\r\n".encode()
            received = b""
            sent_start = False
            while len(received) < len(big):  # read slowly: about three seconds
                chunk = sock.recv(256 * 1024)
                assert chunk, "the connection was cut during the answer"
                received += chunk
                time.sleep(0.024)
                if not sent_start and time.monotonic() - opened > 2.5:
                    sock.sendall(second[:10])  # the next head begins, after header_timeout from opening
                    sent_start = True
                if received.find(b"\r\n\r\n") > 0 and len(received) - received.find(b"\r\n\r\n") - 4 >= len(
                    big
                ):
                    break
            assert sent_start
            sock.sendall(second[10:])
            answers = read_answers(sock, 1, [False])
            assert answers and answers[0].startswith(b"HTTP/1.1 200"), answers
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


def test_skopeo_pulls_on_the_fast_path(pair: Pair, tmp_path: Path) -> None:
    """skopeo (containers/image) sends `Connection: close` with every request: those requests are
    served on the fast path too, and the image arrives whole."""
    from gateway.sample_image import write_image
    from tests.conftest import skopeo_copy, write_authfile

    image = tmp_path / "image"
    write_image(image, "1", layers=3, layer_bytes=200_000)
    admin = write_authfile(tmp_path / "admin.json", pair.fast.host, ("admin", "admin-secret-pw"))
    pushed = skopeo_copy(f"oci:{image}:1", f"docker://{pair.fast.host}/admin/app:1", admin)
    assert pushed.returncode == 0, pushed.stderr
    before = fast_path_counts(pair.fast_metrics)
    reader = write_authfile(tmp_path / "reader.json", pair.fast.host, ("reader", "reader-secret-pw"))
    pulled = skopeo_copy(f"docker://{pair.fast.host}/admin/app:1", f"oci:{tmp_path / 'pulled'}:1", reader)
    assert pulled.returncode == 0, pulled.stderr
    after = fast_path_counts(pair.fast_metrics)
    served = after["served"] - before["served"]
    # The manifest and the three layers and config at least (the first login is the full path's).
    assert served >= 4, served
    # skopeo sends `Connection: close` with every request, and the same headers for each blob:
    # their sections are taken over from the connections before (fast_path.Sections).
    assert after["section_reused"] - before["section_reused"] >= 2, (before, after)
    source = {p.name for p in (image / "blobs" / "sha256").iterdir()}
    assert source <= {p.name for p in (tmp_path / "pulled" / "blobs" / "sha256").iterdir()}


def test_a_connection_comes_back_to_the_fast_path_after_the_full_path(pair: Pair) -> None:
    """As docker does on one connection: a challenge, a first login (bcrypt, on the full path),
    then pulls, which the fast path takes back; an upload goes to the full path and back again."""
    admin = f"Authorization: {auth('admin')}\r\nX-Test: comes-back\r\n"  # sections of this test's own
    requests = [
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",  # anonymous: challenged
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\n{admin}\r\n".encode(),  # the first login
        f"GET /v2/public/app/manifests/1 HTTP/1.1\r\nHost: x\r\n{admin}Accept: {OCI_MANIFEST}\r\n\r\n".encode(),
        f"HEAD /v2/public/app/blobs/{pair.blob} HTTP/1.1\r\nHost: x\r\n{admin}\r\n".encode(),
        f"POST /v2/admin/up/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n{admin}Content-Length: 0\r\n\r\n".encode(),
        f"GET /v2/public/app/manifests/1 HTTP/1.1\r\nHost: x\r\n{admin}Accept: {OCI_MANIFEST}\r\n\r\n".encode(),
    ]
    before = fast_path_counts(pair.fast_metrics)
    fast = send_all(pair.fast.host, requests)
    after = fast_path_counts(pair.fast_metrics)
    full = send_all(pair.full.host, requests)
    assert [answer.split(b" ", 2)[1] for answer in fast] == [b"401", b"200", b"200", b"200", b"202", b"200"]
    for index, (one, other) in enumerate(zip(fast, full, strict=True)):
        if index != 4:  # the upload's Location names an upload of its own
            assert normalised(one) == normalised(other), requests[index]
    changes = {key: after[key] - before[key] for key in after}
    # Handed over for the challenge, the login and the upload; taken back after each. The last
    # head's section is the third one's, seen a second time: kept from now on (fastpath.Sections).
    # The second GET of the manifest has the first one's answer head when both fall within the
    # second the registry's Date names (upstream.KnownHead); the HEAD's answer head was new.
    assert changes["answer_reused"] in (0, 1), changes
    del changes["answer_reused"]
    assert changes == {"served": 3, "handed_off": 3, "taken_back": 3, "section_reused": 0}, changes


def test_a_known_header_section_carries_no_decision(pair: Pair) -> None:
    """Heads with the same headers reuse their parse (a kept header section), never what was
    decided: after allowed requests, the same credentials on a repository they may not pull are
    refused, and anonymous heads on a hidden repository challenged, exactly as on the full path."""

    def head_with(path: str, credentials: str) -> bytes:
        return f"HEAD {path} HTTP/1.1\r\nHost: x\r\n{credentials}Accept: {OCI_MANIFEST}\r\n\r\n".encode()

    alice = f"Authorization: {auth('alice')}\r\n"
    requests = [
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\n{alice}\r\n".encode(),  # the first login (full path)
        head_with("/v2/alice/x/manifests/1", alice),  # allowed (the registry has no such manifest)
        head_with("/v2/alice/x/manifests/1", alice),  # the same head: its section seen twice, kept
        head_with("/v2/secret/hidden/manifests/1", alice),  # the same section: refused
        head_with("/v2/alice/x/manifests/1", alice),  # taken back: allowed again
    ]
    anonymous = [
        head_with("/v2/public/app/manifests/1", ""),  # allowed by the ACL
        head_with("/v2/public/app/manifests/1", ""),  # its section seen twice, kept
        head_with("/v2/secret/hidden/manifests/1", ""),  # the same section: challenged
        head_with("/v2/public/app/manifests/1", ""),  # taken back: allowed again
    ]
    before = fast_path_counts(pair.fast_metrics)
    fast = send_all(pair.fast.host, requests) + send_all(pair.fast.host, anonymous)
    after = fast_path_counts(pair.fast_metrics)
    full = send_all(pair.full.host, requests) + send_all(pair.full.host, anonymous)
    statuses = [answer.split(b" ", 2)[1] for answer in fast]
    assert statuses == [b"200", b"404", b"404", b"403", b"404", b"200", b"200", b"401", b"200"], statuses
    for index, (one, other) in enumerate(zip(fast, full, strict=True)):
        assert normalised(one) == normalised(other), index
    changes = {key: after[key] - before[key] for key in after}
    # A section is kept at its second sight (fastpath.Sections): the refused heads and the last
    # of each list had theirs taken over, and only the allowed ones are counted.
    assert changes["section_reused"] >= 2, changes  # the shortcut was taken, and refused nothing
    records = audit_records(pair.fast_audit, 1 + len(requests) + len(anonymous))
    decisions = [(record["repository"], record["decision"]) for record in records[-len(anonymous) - 2 :]]
    assert decisions[0] == ("secret/hidden", "deny"), decisions
    assert decisions[-2] == ("secret/hidden", "challenge"), decisions


def test_a_header_section_is_taken_over_for_its_own_peer_only(pair: Pair) -> None:
    """As skopeo does: each request on a connection of its own. A head's section is taken over
    from another connection of the same peer, never from another peer's: the client address the
    registry is told of and the audit record name the peer that sent it."""
    head = f"HEAD /v2/public/app/manifests/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\n"
    head += f"Accept: {OCI_MANIFEST}\r\nX-Test: own-peer\r\nConnection: close\r\n\r\n"
    request = head.encode()
    login = request.replace(b"X-Test: own-peer", b"X-Test: own-peer-login")
    send_all(pair.fast.host, [login])  # a first login, if this user has had none: the full path
    reused = []
    for source in ["127.0.0.1"] * 3 + ["127.0.0.2"] * 3:
        before = fast_path_counts(pair.fast_metrics)
        recorded = len(audit_records(pair.fast_audit, 0))
        answer = send_all(pair.fast.host, [request], source)
        after = fast_path_counts(pair.fast_metrics)
        assert answer[0].startswith(b"HTTP/1.1 200"), answer
        assert after["served"] == before["served"] + 1
        reused.append(after["section_reused"] - before["section_reused"])
        records = audit_records(pair.fast_audit, recorded + 1)
        assert len(records) == recorded + 1 and records[-1]["client"] == source, records[recorded:]
    # Kept at its second sight, taken over from then on; from another peer, parsed anew until
    # seen there twice.
    assert reused == [0, 0, 1, 0, 0, 1], reused


def _digest(answer: bytes) -> str:
    found = re.search(rb"(?im)^docker-content-digest: *(\S+)\r$", answer)
    assert found is not None, answer
    return found.group(1).decode()


def test_an_answer_head_the_registry_sent_before_is_answered_alike(pair: Pair) -> None:
    """The same answer head from the registry again (the same HEAD within the second its Date
    names) is answered from what was made of it the first time (upstream.KnownHead): exactly as
    the full path answers, errors too, and for GET (its body counted) as for HEAD, the two kept
    apart though the registry's heads are the same bytes. A changed answer (the tag pushed again)
    is read anew, at once, never taken for the one before."""
    registry_host = pair.registry.url.removeprefix("http://")
    _, pushed = push_image(registry_host, "public/app", "2")
    reader = f"Host: x\r\nAuthorization: {auth('reader')}\r\nX-Test: known-answers\r\n"
    accept = f"Accept: {OCI_MANIFEST}\r\n"
    tag = f"HEAD /v2/public/app/manifests/2 HTTP/1.1\r\n{reader}{accept}\r\n".encode()
    heads = [
        tag,
        f"HEAD /v2/public/app/manifests/missing HTTP/1.1\r\n{reader}{accept}\r\n".encode(),  # 404
        f"HEAD /v2/public/app/blobs/{pair.blob} HTTP/1.1\r\n{reader}\r\n".encode(),
        tag.replace(b"HEAD ", b"GET ", 1),  # the same head as the HEAD's, and the manifest
        f"GET /v2/public/app/manifests/missing HTTP/1.1\r\n{reader}{accept}\r\n".encode(),
    ]
    for gateway in (pair.fast, pair.full):  # the login (bcrypt, on the full path), cached
        send_all(gateway.host, [f"GET /v2/ HTTP/1.1\r\n{reader}\r\n".encode()])
    before = fast_path_counts(pair.fast_metrics)
    fast = send_all(pair.fast.host, heads * 3)
    after = fast_path_counts(pair.fast_metrics)
    full = send_all(pair.full.host, heads * 3)
    assert [answer.split(b" ", 2)[1] for answer in fast] == [b"200", b"404", b"200", b"200", b"404"] * 3
    for one, other in zip(fast, full, strict=True):
        assert normalised(one) == normalised(other)
    assert after["served"] - before["served"] == 15
    # Each request three times within a second (well within): the registry's Date changes once
    # at most, so each was answered from a head seen before at least once.
    assert after["answer_reused"] - before["answer_reused"] >= 5, (before, after)
    assert {_digest(answer) for answer in fast[::5] + fast[3::5]} == {pushed}
    assert all(not answer.endswith(b"\r\n\r\n") for answer in fast[3::5])  # the manifest came

    _, pushed_again = push_image(registry_host, "public/app", "2")
    assert pushed_again != pushed
    assert [_digest(answer) for answer in send_all(pair.fast.host, [tag, tag])] == [pushed_again] * 2


def test_a_body_ending_in_the_read_that_begins_the_next_head_loses_nothing(pair: Pair) -> None:
    """The end of a request body and the start of the next head in one read: aiohttp's parser
    keeps that start where the gateway cannot see it, so the connection stays with the full
    path, and the next request is answered whole."""
    admin = f"Host: x\r\nAuthorization: {auth('admin')}\r\n"
    send_all(pair.fast.host, [f"GET /v2/ HTTP/1.1\r\n{admin}\r\n".encode()])  # the login
    address, port = pair.fast.host.split(":")
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(
            f"PUT /v2/admin/app/manifests/t HTTP/1.1\r\n{admin}Content-Type: {OCI_MANIFEST}\r\n"
            "Content-Length: 3\r\n\r\n".encode()
        )
        time.sleep(0.2)
        following = (
            f"GET /v2/public/app/manifests/1 HTTP/1.1\r\n{admin}Accept: {OCI_MANIFEST}\r\n\r\n".encode()
        )
        sock.sendall(b"abc" + following[:20])
        time.sleep(0.3)
        sock.sendall(following[20:])
        answers = read_answers(sock, 2, [False, False])
    assert [answer.split(b" ", 2)[1] for answer in answers] == [b"400", b"200"], answers


def flood_until_answers_stop(
    sock: socket.socket, request: bytes, metrics_url: str
) -> tuple[int, list[float], bool]:
    """Send `request` over and over, reading nothing, until the gateway's answers stop for two
    seconds (the kernel's buffers, a few MiB, are full and it waits for the client) or it cuts
    the connection, for at most two minutes or 64 MiB sent. The bytes sent, the fast-path answers
    counted every half second, and whether the connection was cut."""
    sock.setblocking(False)
    served_before = fast_path_counts(metrics_url)["served"]
    sent = 0
    served: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sent < 64 << 20:
        if len(served) > 4 and served[-1] == served[-5]:
            break
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            try:
                sent += sock.send(request * 50)
            except BlockingIOError:
                time.sleep(0.01)
            except (ConnectionResetError, BrokenPipeError):
                return sent, served, True
        served.append(fast_path_counts(metrics_url)["served"] - served_before)
    sock.setblocking(True)
    return sent, served, False


def test_a_client_that_pipelines_without_reading_fills_neither_memory_nor_buffers(pair: Pair) -> None:
    """A client sends requests without end and never reads an answer: reading from it stops once
    a head's worth waits (resuming per answer let in a whole read per request: half a gigabyte
    in six seconds), and no answer is taken while the client does not read the last ones
    (body-less answers went into the transport's buffer regardless, without bound). Once it
    reads again, the requests held back are answered."""
    admin = f"Host: x\r\nAuthorization: {auth('admin')}\r\n"
    send_all(pair.fast.host, [f"GET /v2/ HTTP/1.1\r\n{admin}\r\n".encode()])  # the login, cached
    head = f"HEAD /v2/public/app/manifests/1 HTTP/1.1\r\n{admin}\r\n".encode()
    address, port = pair.fast.host.split(":")
    rss_before = pair.fast.rss_kib()
    served_before = fast_path_counts(pair.fast_metrics)["served"]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((address, int(port)))
        sent, served, cut = flood_until_answers_stop(sock, head, pair.fast_metrics)
        assert not cut
        grown_mib = (pair.fast.rss_kib() - rss_before) / 1024
        # The client's sending was stopped (the gateway read at most a head's worth more).
        assert sent < 16 << 20, sent
        assert grown_mib < 16, grown_mib
        # Answers stopped: the gateway's send queue in the kernel is full (it grows to 4 MiB, which
        # takes a minute of answers on a slow machine), and none piles up in the gateway.
        assert len(served) > 4 and served[-1] == served[-5], served
        sock.settimeout(10)
        received = 0
        until = time.monotonic() + 1
        while time.monotonic() < until:
            received += len(sock.recv(1 << 20))
    # Reading again, the client got answers the gateway had held back.
    assert fast_path_counts(pair.fast_metrics)["served"] - served_before > served[-1], served
    assert received > 1 << 20, received


def test_a_client_that_stops_reading_with_a_request_waiting_is_cut_after_body_timeout(tmp_path: Path) -> None:
    registry = start_registry(tmp_path)
    gateway = None
    try:
        push_image(registry.url.removeprefix("http://"), "public/app", "1")
        gateway, metrics_url = metered_gateway(tmp_path, registry, {"GATEWAY_BODY_TIMEOUT": "1"})
        admin = f"Host: x\r\nAuthorization: {auth('admin')}\r\n"
        send_all(gateway.host, [f"GET /v2/ HTTP/1.1\r\n{admin}\r\n".encode()])
        head = f"HEAD /v2/public/app/manifests/1 HTTP/1.1\r\n{admin}\r\n".encode()
        address, port = gateway.host.split(":")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((address, int(port)))
            _, served, cut = flood_until_answers_stop(sock, head, metrics_url)
        # Cut a second after the client stopped taking answers, before two seconds without one.
        assert cut, served
        assert "client took no answer bytes for 1s with a request waiting: cut off" in gateway.log.read_text()
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


@pytest.mark.parametrize("same_read", [False, True], ids=["after-the-answer", "in-the-same-read"])
def test_a_head_trickled_after_a_full_path_answer_is_cut_on_time(tmp_path: Path, same_read: bool) -> None:
    """After a request the full path answered (an anonymous challenge), the next head trickled in
    a byte at a time is cut header_timeout after its own first byte, wherever the connection is by
    then: taken back by the fast path (the head began after the answer) or still on the full path
    (its first bytes came in the same read as the challenged request)."""
    registry = start_registry(tmp_path)
    gateway = None
    try:
        gateway = gateway_with_policy(
            tmp_path, registry, env={"GATEWAY_HEADER_TIMEOUT": "2", "GATEWAY_KEEPALIVE_TIMEOUT": "60"}
        )
        address, port = gateway.host.split(":")
        challenged = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection((address, int(port)), timeout=10) as sock:
            sock.sendall(challenged + b"G" if same_read else challenged)
            first_byte = time.monotonic()
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 401"), answer
            if not same_read:
                # Idle, on the fast path again: the next head's clock starts at its first byte.
                time.sleep(1.0)
                sock.sendall(b"G")
                first_byte = time.monotonic()
            closed_at = trickle_until_cut(sock, b"ET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
            assert closed_at is not None, "the trickled head was never cut"
            # Due 2 s after its first byte: not sooner (a clock started earlier), not much later.
            assert 1.8 < closed_at - first_byte < 3.2, closed_at - first_byte
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


class _SlowRegistry(http.server.BaseHTTPRequestHandler):
    """Stands in for a registry that does not answer one HEAD (the real one cannot be made to):
    `/v2/` and `.../quick` at once, `.../slow` after 30 s."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        if self.path.endswith("/slow"):
            time.sleep(30)
        self._answer()

    def _answer(self) -> None:
        self.send_response(200)
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


def _stand_in(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.ThreadingHTTPServer:
    """A registry's stand-in on a free port, served from a thread until shut down."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    return upstream


def _reader_gateway(
    directory: Path, upstream: http.server.ThreadingHTTPServer, env: dict[str, str]
) -> tuple[Gateway, Path]:
    """A gateway in front of a stand-in, with the user `reader` and an audit log (its path)."""
    users = directory / "htpasswd"
    htpasswd_add(users, "reader", "reader-pw")
    audit = directory / "audit.jsonl"
    upstream_url = f"http://127.0.0.1:{upstream.server_address[1]}"
    return start_gateway(directory, upstream_url, users, "--audit-log", str(audit), env=env), audit


class _ChunkedRegistry(http.server.BaseHTTPRequestHandler):
    """Stands in for a registry answering with a chunked body (distribution sets a length on what
    it sends): `/v2/` with a length, anything else in three chunks, all in one write."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nDocker-Distribution-Api-Version: registry/2.0\r\n"
        head += b"Content-Type: application/json\r\n"
        if self.path == "/v2/":
            self.wfile.write(head + b"Content-Length: 2\r\n\r\n{}")
        else:
            body = b'5\r\n{"a":\r\n3\r\n 1,\r\n6\r\n"b":2}\r\n0\r\n\r\n'
            self.wfile.write(head + b"Transfer-Encoding: chunked\r\n\r\n" + body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_chunked_body_that_came_with_its_head_is_answered_as_the_full_path_does(tmp_path: Path) -> None:
    """A body that came whole with its answer head is written from the head's callback (no task);
    chunked, it is framed piece by piece as the full path frames it, and recorded alike."""
    upstream = _stand_in(_ChunkedRegistry)
    started: list[Gateway] = []
    try:
        answers = []
        audits = []
        for fast_path in ("true", "false"):
            directory = tmp_path / fast_path
            directory.mkdir()
            gateway, audit = _reader_gateway(directory, upstream, {"GATEWAY_FAST_PATH": fast_path})
            started.append(gateway)
            credentials = "Authorization: Basic " + base64.b64encode(b"reader:reader-pw").decode()
            login = f"GET /v2/ HTTP/1.1\r\nHost: x\r\n{credentials}\r\n\r\n".encode()
            get = f"GET /v2/x/manifests/1 HTTP/1.1\r\nHost: x\r\n{credentials}\r\n\r\n".encode()
            answers.append(send_all(gateway.host, [login, get, get, get]))
            audits.append(audit_records(audit, 5))
        fast, full = answers
        for fast_answer, full_answer in zip(fast, full, strict=True):
            assert normalised(fast_answer) == normalised(full_answer)
        assert fast[-1].endswith(b'\r\n\r\n5\r\n{"a":\r\n3\r\n 1,\r\n6\r\n"b":2}\r\n0\r\n\r\n')
        assert audits[0] == audits[1]
        assert [record["bytes_out"] for record in audits[0][-3:]] == [14, 14, 14]
    finally:
        for gateway in started:
            stop(gateway.process)
        upstream.shutdown()
        upstream.server_close()


def test_shutdown_gives_up_on_a_request_without_a_task_after_its_grace(tmp_path: Path) -> None:
    """A HEAD sent at once on a pooled registry connection (no task: UpstreamPool.send_at_once)
    that the registry does not answer: on SIGTERM it has shutdown_grace, then it is given up as
    a task would be, recorded as an error with no status, its client cut, and the gateway exits."""
    upstream = _stand_in(_SlowRegistry)
    gateway, audit = _reader_gateway(
        tmp_path, upstream, {"GATEWAY_SHUTDOWN_GRACE": "2", "GATEWAY_READ_TIMEOUT": "60"}
    )
    try:
        credentials = "Authorization: Basic " + base64.b64encode(b"reader:reader-pw").decode()
        quick = f"HEAD /v2/x/manifests/quick HTTP/1.1\r\nHost: x\r\n{credentials}\r\n\r\n".encode()
        # The login (the full path), then on the fast path with a pooled registry connection.
        assert [a.split(b" ")[1] for a in send_all(gateway.host, [quick, quick])] == [b"200", b"200"]
        address, port = gateway.host.split(":")
        with socket.create_connection((address, int(port)), timeout=20) as sock:
            sock.sendall(quick.replace(b"quick", b"slow"))
            time.sleep(0.5)
            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert sock.recv(65536) == b""  # cut, no answer
            assert 1.5 < time.monotonic() - signalled < 10
        assert gateway.process.wait(timeout=20) == 0
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        assert [(r["path"], r["status"], r["decision"]) for r in records[-1:]] == [
            ("/v2/x/manifests/slow", 0, "error")
        ]
    finally:
        stop(gateway.process)
        upstream.shutdown()
        upstream.server_close()
