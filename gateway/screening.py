"""What the registry will read from a request, and whether we read it the same way. Pure: no I/O.

The gateway's promise is that what it authorizes is exactly what the registry does, so every part
of a request that distribution 2.8 (Go net/http, gorilla/mux, its handlers) reads is decided here,
in one place, before anything is forwarded. Each part is read by us exactly as the registry reads
it, set by us, or refused with a 4xx in the registry's JSON format:

- Path. The registry routes it (gorilla/mux, greedy names). `routes.parse_request` has the same
  routes; percent escapes, dot and empty segments are refused, since Go would decode them.
- Query. Read with `r.URL.Query()` and `r.FormValue` (`mount`, `from`, `digest`, `_state`, `n`,
  `last`). `routes.parse_query` decodes it as Go does and refuses what Go would read otherwise.
- A body of type `application/x-www-form-urlencoded` or `multipart/form-data` (any `multipart/`).
  `r.FormValue` reads the fields of such POST/PUT/PATCH bodies too, before the query: a `mount`
  and `from` there is a blob mount we never saw. Refused (415); no registry client sends forms.
- `Content-Type`. The manifest's media type, and the form test above (first value, through
  `mime.ParseMediaType`). One printable-ASCII value, forwarded; several are refused (400). On a
  `PATCH` of an upload, distribution takes only `application/octet-stream` (else its 500): 415.
- `Content-Encoding`. Ignored: Go never decodes a request body and the registry stores the bytes
  as sent. Forwarded, with the bytes as sent (the server's decompression is turned off).
- `Transfer-Encoding`. Go accepts only `chunked` (else 501). Only `chunked`, else refused (400:
  the client's request is at fault, not the gateway); the body is framed anew by us.
- `Content-Length`. Set by us to the length we send. Bodies only on the routes that take one
  (`BODY_ROUTES`), else refused (400).
- `Expect`. Go answers `100-continue` when the handler reads the body and any other value with
  417. We answer `100-continue` only once the request is authorized; any other value gets 417.
- `Upgrade`. The registry ignores it (it has no h2c), but aiohttp stops parsing the connection as
  HTTP after an upgrade request: answered, then the connection is closed; refused with a body.
- `Host`, `Forwarded`, `X-Forwarded-*`, `X-Real-IP`: the registry's `Location` URLs. One valid
  host with a port in 1-65535; the rest set by us (`forwarding`).
- `Authorization` (read by the registry only in token mode), `Connection` and what it names,
  `Keep-Alive`, `TE`, `Trailer`, `Proxy-*`: not forwarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.routes import Operation, Route, RouteError, parse_request

# The routes and methods that take a request body; every other request must come without one.
BODY_ROUTES = frozenset(
    {
        (Route.UPLOAD_START, "POST"),  # distribution 2.8 ignores it, the OCI spec allows a monolithic upload
        (Route.UPLOAD, "PATCH"),
        (Route.UPLOAD, "PUT"),
        (Route.MANIFEST, "PUT"),
    }
)
# Media types Go's r.FormValue reads fields from (ParseForm, ParseMultipartForm).
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
_HEADER_TEXT = re.compile(r"[\x20-\x7e\t]*")


@dataclass(slots=True)  # made per request: not frozen (docs/performance.md, "Records made per request")
class Admitted:
    """A request the registry will read as we do, and how to forward it."""

    operation: Operation | RouteError  # a RouteError here is answered after authentication
    content_length: int | None  # with `has_body`: the length to declare; None: chunked
    has_body: bool
    expect_continue: bool  # send `100 Continue` once the request is authorized
    close_after: bool  # the connection cannot carry another request after this one


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str


Headers = CIMultiDictProxy[str] | CIMultiDict[str]


def _one(headers: Headers, name: str) -> str | Refusal | None:
    values = headers.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        return Refusal(400, "UNSUPPORTED", f"more than one {name} header")
    return values[0]


@dataclass(slots=True)  # made per request on the full path: not frozen (docs/performance.md)
class HeaderFacts:
    """What a request's headers say, before its route is known (screen_headers): the same for every
    request that sends the same headers with the same method, so the fast path keeps it with a
    header section (fastpath.Section)."""

    refusal: Refusal | None  # Content-Type, Transfer-Encoding or Content-Length refused
    content_length: int | None
    chunked: bool
    expectations: tuple[str, ...]  # Expect's tokens, lower case
    upgrade: bool  # an Upgrade header, or CONNECT


_FORM_REFUSAL = Refusal(
    415,
    "UNSUPPORTED",
    "form and multipart bodies are not accepted: the registry reads their fields as parameters",
)
_CHUNK_TYPE_REFUSAL = Refusal(415, "UNSUPPORTED", "a blob upload chunk must be application/octet-stream")


def _refused(refusal: Refusal) -> HeaderFacts:
    return HeaderFacts(refusal, None, False, (), False)


def screen_headers(method: str, headers: Headers) -> HeaderFacts:
    """The header part of `screen`: Content-Type, Transfer-Encoding, Content-Length, Expect, Upgrade."""

    content_type = _one(headers, "Content-Type")
    if isinstance(content_type, Refusal):
        return _refused(content_type)
    if content_type is not None:
        if not _HEADER_TEXT.fullmatch(content_type):
            return _refused(Refusal(400, "UNSUPPORTED", "Content-Type must be printable ASCII"))
        media_type = content_type.split(";", 1)[0].strip(" \t").lower()
        if media_type in _FORM_TYPES or media_type.startswith("multipart/"):
            return _refused(_FORM_REFUSAL)
        if method == "PATCH" and content_type != "application/octet-stream":
            # distribution's PatchBlobData takes exactly this value (or none) and answers 500 otherwise.
            return _refused(_CHUNK_TYPE_REFUSAL)

    transfer_encoding = headers.getall("Transfer-Encoding", [])
    chunked = bool(transfer_encoding)
    if chunked and [value.strip(" \t").lower() for value in transfer_encoding] != ["chunked"]:
        return _refused(Refusal(400, "UNSUPPORTED", "only Transfer-Encoding: chunked is supported"))
    length_text = _one(headers, "Content-Length")
    if isinstance(length_text, Refusal):
        return _refused(length_text)
    content_length = None
    if length_text is not None:
        if chunked or not length_text.isascii() or not length_text.isdigit() or len(length_text) > 18:
            return _refused(Refusal(400, "UNSUPPORTED", "invalid Content-Length"))
        content_length = int(length_text)
    expectations = [
        token.strip(" \t").lower()
        for value in headers.getall("Expect", [])
        for token in value.split(",")
        if token.strip(" \t")
    ]
    upgrade = bool(headers.getall("Upgrade", [])) or method == "CONNECT"
    return HeaderFacts(None, content_length, chunked, tuple(expectations), upgrade)


def screen(
    method: str, target: str, headers: Headers, facts: HeaderFacts | None = None
) -> Admitted | Refusal:
    """Decide a request from its method, raw target (as sent) and headers, as this module's
    docstring says. `facts`: screen_headers(method, headers), when known already."""
    operation = parse_request(method, target)
    if isinstance(operation, RouteError) and not operation.after_authentication:
        return Refusal(operation.status, operation.code, operation.message)

    if facts is None:
        facts = screen_headers(method, headers)
    if facts.refusal is not None:
        return facts.refusal
    chunked = facts.chunked
    content_length = facts.content_length
    has_body = chunked or bool(content_length)
    if has_body:
        takes_body = isinstance(operation, Operation) and (operation.route, method) in BODY_ROUTES
        if not takes_body:
            return Refusal(400, "UNSUPPORTED", f"{method} on this endpoint takes no request body")

    expect_continue = False
    if facts.expectations:
        if any(token != "100-continue" for token in facts.expectations):
            return Refusal(417, "UNSUPPORTED", "unsupported Expect header")
        expect_continue = has_body

    upgrade = facts.upgrade
    if upgrade and has_body:
        return Refusal(400, "UNSUPPORTED", "protocol upgrades are not supported")

    return Admitted(
        operation=operation,
        content_length=content_length if not chunked else None,
        has_body=has_body,
        expect_continue=expect_continue,
        close_after=upgrade,
    )
