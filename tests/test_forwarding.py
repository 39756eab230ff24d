"""Which headers cross the gateway: hop-by-hop, credentials, and forwarding headers of untrusted clients."""

from __future__ import annotations

import ipaddress

import pytest
from multidict import CIMultiDict

from gateway import forwarding

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def raw(sent: CIMultiDict[str]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name.encode(), value.encode()) for name, value in sent.items())


def head_headers(head: bytes) -> tuple[str, CIMultiDict[str]]:
    """The request line and headers of a serialised head (which must end with the blank line)."""
    assert head.endswith(b"\r\n\r\n")
    line, *rest = head[:-4].decode().split("\r\n")
    pairs = [entry.partition(": ") for entry in rest]
    return line, CIMultiDict((name, value) for name, _, value in pairs)


def test_untrusted_client_cannot_spoof_forwarding() -> None:
    sent = headers(
        ("Host", "reg.example:8080"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=1.2.3.4;host=evil.example;proto=https"),
        ("X-Real-IP", "1.2.3.4"),
    )
    view = forwarding.client_view("192.0.2.7", "http", "reg.example:8080", sent, TRUSTED)
    assert view == forwarding.ClientView("192.0.2.7", ("192.0.2.7",), "http", "reg.example:8080")
    line, out = head_headers(forwarding.upstream_request_head("GET", "/v2/", raw(sent), view))
    assert line == "GET /v2/ HTTP/1.1"
    assert "Forwarded" not in out
    assert out["Host"] == "reg.example:8080"
    assert out["X-Forwarded-Host"] == "reg.example:8080"
    assert out["X-Forwarded-Proto"] == "http"
    assert out.getall("X-Forwarded-For") == ["192.0.2.7"]
    assert out["X-Real-IP"] == "192.0.2.7"


def test_trusted_proxy_chain() -> None:
    sent = headers(
        ("X-Forwarded-For", "203.0.113.9, 10.1.1.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "registry.example.com"),
    )
    view = forwarding.client_view("10.0.0.2", "http", "gateway:8080", sent, TRUSTED)
    assert view.address == "203.0.113.9"
    assert view.scheme == "https"
    assert view.host == "registry.example.com"
    assert view.forwarded_for == ("203.0.113.9", "10.1.1.1", "10.0.0.2")


def test_trusted_proxy_with_spoofed_leftmost_entry() -> None:
    # The client prepended a fake address; the real one is the rightmost untrusted hop.
    sent = headers(("X-Forwarded-For", "6.6.6.6, 198.51.100.1"))
    view = forwarding.client_view("10.0.0.2", "http", "h", sent, TRUSTED)
    assert view.address == "198.51.100.1"


def test_trusted_proxy_bad_values_fall_back() -> None:
    sent = headers(("X-Forwarded-Proto", "gopher"), ("X-Forwarded-Host", "bad host/x"))
    view = forwarding.client_view("10.0.0.2", "http", "h:1", sent, TRUSTED)
    assert (view.scheme, view.host) == ("http", "h:1")


def test_credentials_and_hop_by_hop_are_not_forwarded() -> None:
    sent = headers(
        ("Authorization", "Basic YTpi"),
        ("Proxy-Authorization", "Basic YTpi"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Expect", "100-continue"),
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", "10"),
        ("Accept", "application/vnd.oci.image.manifest.v1+json"),
        ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
        ("Range", "bytes=0-9"),
        ("User-Agent", "skopeo/1.9"),
    )
    view = forwarding.client_view("127.0.0.1", "http", "h:1", sent, ())
    head = forwarding.upstream_request_head(
        "PUT", "/v2/a/blobs/uploads/u?digest=sha256:1", raw(sent), view, content_length=7
    )
    line, out = head_headers(head)
    assert line == "PUT /v2/a/blobs/uploads/u?digest=sha256:1 HTTP/1.1"
    for name in (
        "Authorization",
        "Proxy-Authorization",
        "Connection",
        "X-Secret-Hop",
        "Keep-Alive",
        "Transfer-Encoding",
        "TE",
        "Upgrade",
        "Expect",
    ):
        assert name not in out, name
    assert out.getall("Accept") == [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
    # Framing is ours: the length we send, never the client's header as it was.
    assert out.getall("Content-Length") == ["7"]
    assert out["Range"] == "bytes=0-9"
    assert out["User-Agent"] == "skopeo/1.9"


def test_response_headers() -> None:
    got = headers(
        ("Content-Length", "5"),
        ("Docker-Content-Digest", "sha256:abc"),
        ("Location", "http://h:1/v2/a/blobs/uploads/u?_state=x%3D"),
        ("Connection", "close"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Encoding", "gzip"),
        ("Link", '</v2/_catalog?last=b&n=1>; rel="next"'),
    )
    out = forwarding.downstream_response_headers(raw(got))
    assert "Connection" not in out and "Transfer-Encoding" not in out
    assert out["Location"] == "http://h:1/v2/a/blobs/uploads/u?_state=x%3D"
    assert out["Content-Encoding"] == "gzip"
    assert out["Content-Length"] == "5"


def test_request_framing_is_ours() -> None:
    sent = headers(("Content-Length", "99"), ("Transfer-Encoding", "chunked"), ("Host", "h:1"))
    view = forwarding.client_view("127.0.0.1", "http", "h:1", sent, ())
    cases = [
        ({"chunked": True}, [], ["chunked"]),
        ({"content_length": 0}, ["0"], []),
        ({"content_length": 12}, ["12"], []),
        ({}, [], []),
    ]
    for framing, lengths, encodings in cases:
        _, out = head_headers(forwarding.upstream_request_head("PATCH", "/v2/", raw(sent), view, **framing))  # type: ignore[arg-type]
        assert out.getall("Content-Length", []) == lengths, framing
        assert out.getall("Transfer-Encoding", []) == encodings, framing
        assert out.getall("Host") == ["h:1"]


def test_registry_credentials_replace_the_clients() -> None:
    sent = headers(("Authorization", "Bearer client-token"), ("Host", "h:1"))
    view = forwarding.client_view("127.0.0.1", "http", "h:1", sent, ())
    _, out = head_headers(forwarding.upstream_request_head("GET", "/v2/", raw(sent), view, "Bearer minted"))
    assert out.getall("Authorization") == ["Bearer minted"]
    _, out = head_headers(forwarding.upstream_request_head("GET", "/v2/", raw(sent), view))
    assert "Authorization" not in out


def test_raw_header_bytes_cross_unchanged() -> None:
    # Names keep their case and values their bytes (aiohttp decoded them with surrogateescape).
    view = forwarding.client_view("127.0.0.1", "http", "h:1", headers(), ())
    sent = ((b"x-Odd-CASE", b"caf\xc3\xa9 \xff"),)
    head = forwarding.upstream_request_head("GET", "/v2/", sent, view)
    assert b"\r\nx-Odd-CASE: caf\xc3\xa9 \xff\r\n" in head
    out = forwarding.downstream_response_headers(
        ((b"X-Odd", b"\xff"), (b"Docker-Content-Digest", b"sha256:1"))
    )
    assert out["X-Odd"] == "\ufffd" and out["Docker-Content-Digest"] == "sha256:1"


def test_host_validation() -> None:
    for good in (
        "localhost",
        "127.0.0.1:8080",
        "reg.example.com",
        "[::1]:5000",
        "a-b.c",
        "a:65535",
        "a:1",
        "my_registry:5000",
        "example.com.",
    ):
        assert forwarding.valid_host(good), good
    for bad in (
        "",
        "a b",
        "a/b",
        "a@b",
        "-a",
        "a:99999999",
        "a:99999",
        "a:65536",
        "a:0",
        "a\r\nX-Injected: 1",
        "a\n",
    ):
        assert not forwarding.valid_host(bad), bad


@pytest.mark.parametrize(
    "registry_headers",
    [
        ((b"Content-Length", b"5"), (b"Docker-Content-Digest", b"sha256:abc"), (b"Date", b"x")),
        ((b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"5"), (b"ETag", b'"e"')),
        ((b"Transfer-Encoding", b"chunked"), (b"Server", b"Go"), (b"Link", b"</v2/x>; rel=next")),
        ((b"X-Odd", b"\xff caf\xc3\xa9"), (b"x-lower", b"v"), (b"Accept-Ranges", b"bytes")),
        ((b"Content-Type", b"a/b"), (b"Content-Type", b"c/d"), (b"Content-Length", b"0")),
        (),
    ],
)
def test_fast_path_response_lines_match_the_full_paths_headers(
    registry_headers: tuple[tuple[bytes, bytes], ...],
) -> None:
    """The fast path's one-pass lines are what aiohttp writes for downstream_response_headers
    (less Server, which both paths replace with the gateway's own)."""
    lines, first = forwarding.downstream_response_lines(registry_headers)
    full = forwarding.downstream_response_headers(registry_headers)
    expected = [f"{name}: {value}\r\n".encode() for name, value in full.items() if name.lower() != "server"]
    assert lines == expected
    assert first == {
        name.lower().encode(): full.getone(name).encode() for name in full if name.lower() != "server"
    }


def test_response_lines_leave_out_what_the_gateway_replaces() -> None:
    sts = b"strict-transport-security"
    registry_headers = [(b"Content-Length", b"5"), (b"Strict-Transport-Security", b"max-age=1")]
    registry_headers.append((b"Date", b"x"))
    lines, first = forwarding.downstream_response_lines(registry_headers, frozenset({sts}))
    assert lines == [b"Content-Length: 5\r\n", b"Date: x\r\n"]
    assert first == {b"content-length": b"5", b"date": b"x"}
