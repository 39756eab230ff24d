"""Which headers cross the gateway, in each direction. Pure: no I/O.

The registry builds absolute `Location` URLs from `Forwarded`, then `X-Forwarded-Proto`/`-Host`,
then `Host`, so those must describe the gateway as the client reached it — and must never be
taken from a client we do not trust, or it could point another step of the push elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.addresses import IPNetwork, canonical_ip, canonical_peer, parse_ip

# RFC 9110 hop-by-hop headers, plus those a proxy must set itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Set by us from what we know, never copied from the client.
CLIENT_HEADERS_DROPPED = HOP_BY_HOP | {
    "host",
    "authorization",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
}

# The body's own description: replaced along with the body when we answer in its place.
CONTENT_HEADERS = frozenset({"content-type", "content-length", "content-encoding", "content-language"})

# Names as resolvers take them (compose service names have `_`; a final `.` is a rooted name).
_HOST_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?")


@dataclass(slots=True)  # made per request: not frozen (docs/performance.md, "Records made per request")
class ClientView:
    """How the client reached us: its address, the scheme and the host it asked for."""

    address: str
    forwarded_for: tuple[str, ...]
    scheme: str
    host: str
    # The client a trusted proxy named is no address (garbage, or a form no parser reads): it
    # would match no `ip:` rule, deny rules included, so such a request is refused (400).
    unreadable: bool = False


def _is_trusted(address: str, trusted: Iterable[IPNetwork]) -> bool:
    ip = parse_ip(address)
    return ip is not None and any(ip in network for network in trusted)


def valid_host(host: str) -> bool:
    """A host name or address, and a port the registry may safely put into `Location` URLs."""
    match = _HOST_RE.fullmatch(host)
    if match is None:
        return False
    port = match.group("port")
    return port is None or 0 < int(port) <= 65535


def client_view(
    peer: str,
    scheme: str,
    host: str,
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
    trusted: tuple[IPNetwork, ...],
) -> ClientView:
    """Who the client is. Forwarding headers count only when the peer is a trusted proxy. Every
    address in it is canonical (addresses.canonical_ip): what policy, lockout, audit and metrics
    key on."""
    peer = canonical_peer(peer)
    if not trusted or not _is_trusted(peer, trusted):
        return ClientView(peer, (peer,), scheme, host)
    chain: list[str] = []
    for value in headers.getall("X-Forwarded-For", []):
        chain.extend(canonical_ip(part.strip()) for part in value.split(",") if part.strip())
    chain.append(peer)
    # The real client is the last address a trusted proxy vouches for: walk in from the right.
    address = peer
    for hop in reversed(chain):
        address = hop
        if not _is_trusted(hop, trusted):
            break
    forwarded_proto = headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    forwarded_host = headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    return ClientView(
        address=address,
        forwarded_for=tuple(chain),
        scheme=forwarded_proto if forwarded_proto in ("http", "https") else scheme,
        host=forwarded_host if forwarded_host and valid_host(forwarded_host) else host,
        unreadable=parse_ip(address) is None,
    )


def forwarding_headers(view: ClientView) -> list[tuple[str, str]]:
    """What the registry is told of how the client reached us (it builds `Location` URLs from them)."""
    return [
        ("Host", view.host),
        ("X-Forwarded-Host", view.host),
        ("X-Forwarded-Proto", view.scheme),
        ("X-Forwarded-For", ", ".join(view.forwarded_for)),
        ("X-Real-IP", view.address),
    ]


_REQUEST_DROPPED = frozenset(name.encode() for name in CLIENT_HEADERS_DROPPED | {"content-length"})
_RESPONSE_DROPPED = frozenset(name.encode() for name in HOP_BY_HOP)
_RESPONSE_LINES_DROPPED = _RESPONSE_DROPPED | {b"server"}


def _raw_connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _encode(text: str) -> bytes:
    # aiohttp decodes what it parsed as UTF-8 with surrogateescape: this gives back the bytes sent.
    return text.encode("utf-8", "surrogateescape")


def upstream_request_head(
    method: str,
    target: str,
    headers: Sequence[tuple[bytes, bytes]],
    view: ClientView,
    authorization: str | None = None,
    content_length: int | None = None,
    chunked: bool = False,
) -> bytes:
    """The request head the registry gets: the client's headers as sent (raw name and value bytes)
    less hop-by-hop, credentials, forwarding and framing headers, then our forwarding headers, the
    registry credentials (in bearer mode), and the framing we chose: `Content-Length` when a length
    is known, `Transfer-Encoding: chunked` when the body is streamed without one."""
    lines = upstream_header_lines(headers, view)
    return upstream_head(method, target, lines, authorization, content_length, chunked)


def upstream_header_lines(headers: Sequence[tuple[bytes, bytes]], view: ClientView) -> bytes:
    """The first part of upstream_request_head's header lines, which depends on the client's
    headers and view alone: theirs as sent less what is dropped, then our forwarding headers."""
    dropped = _REQUEST_DROPPED
    if any(name.lower() == b"connection" for name, _ in headers):
        dropped = dropped | _raw_connection_tokens(headers)
    parts: list[bytes] = []
    for name, value in headers:
        if name.lower() not in dropped:
            parts += (name, b": ", value, b"\r\n")
    for added_name, text in forwarding_headers(view):
        parts.append(_encode(f"{added_name}: {text}\r\n"))
    return b"".join(parts)


def upstream_head(
    method: str,
    target: str,
    lines: bytes,
    authorization: str | None = None,
    content_length: int | None = None,
    chunked: bool = False,
) -> bytes:
    """upstream_request_head from upstream_header_lines' `lines`."""
    parts = [_encode(f"{method} {target} HTTP/1.1\r\n"), lines]
    if authorization:
        parts.append(_encode(f"Authorization: {authorization}\r\n"))
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % content_length)
    parts.append(b"\r\n")
    return b"".join(parts)


def downstream_response_headers(headers: Sequence[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """The registry's response headers (raw, as parsed) as the client should see them."""
    dropped = _RESPONSE_DROPPED
    if any(name.lower() == b"connection" for name, _ in headers):
        dropped = dropped | _raw_connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        if name.lower() not in dropped:
            # The registry sends ASCII; anything else is replaced rather than failing the response.
            out.add(name.decode("latin-1"), value.decode("utf-8", "replace"))
    return out


def downstream_response_lines(
    headers: Sequence[tuple[bytes, bytes]], also_dropped: frozenset[bytes] = frozenset()
) -> tuple[list[bytes], dict[bytes, bytes]]:
    """`downstream_response_headers` as the header lines aiohttp would write for them, built in
    one pass for the fast path, less any `Server` (the gateway sends its own) and the lower-case
    names in `also_dropped`; with the first value of each name kept, by lower-case name."""
    dropped = _RESPONSE_LINES_DROPPED | also_dropped if also_dropped else _RESPONSE_LINES_DROPPED
    if any(name.lower() == b"connection" for name, _ in headers):
        dropped = dropped | _raw_connection_tokens(headers)
    lines: list[bytes] = []
    first: dict[bytes, bytes] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in dropped:
            continue
        if not value.isascii():  # as decoded (U+FFFD for what is not UTF-8), then encoded
            value = value.decode("utf-8", "replace").encode("utf-8")
        lines.append(name + b": " + value + b"\r\n")
        first.setdefault(lower, value)
    return lines, first
