"""Table tests of what the gateway lets the registry read: every header that changes a request's
meaning, body framing per route, the catalog's paging. Pure: no I/O."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway import catalog
from gateway.routes import Operation, RouteError
from gateway.screening import Admitted, Refusal, screen

DIGEST = "sha256:" + "a" * 64
UPLOAD = "/v2/alice/x/blobs/uploads/3f2a7c1e-8b1d-4d1e-9c4b-2a1f0e9d8c7b?_state=abc"
MANIFEST = "/v2/alice/x/manifests/latest"
START = "/v2/alice/x/blobs/uploads/"


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


REFUSED = [
    # method, target, headers, status: what the registry would read differently, refused.
    # Form bodies: Go's r.FormValue would read `mount`/`from` (or `digest`, `_state`) from them.
    ("POST", START, [("Content-Type", "application/x-www-form-urlencoded")], 415),
    ("POST", START, [("Content-Type", "Application/X-WWW-Form-Urlencoded; charset=x")], 415),
    ("POST", START, [("Content-Type", " application/x-www-form-urlencoded ")], 415),
    ("POST", START, [("Content-Type", "multipart/form-data; boundary=X")], 415),
    ("POST", START, [("Content-Type", "multipart/mixed; boundary=X")], 415),
    ("PUT", UPLOAD, [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", "3")], 415),
    ("PATCH", UPLOAD, [("Content-Type", 'multipart/form-data;boundary="a"'), ("Content-Length", "3")], 415),
    ("POST", START, [("Content-Type", "a"), ("Content-Type", "application/x-www-form-urlencoded")], 400),
    ("POST", START, [("Content-Type", "application/x-www-form-urlencoded\x85")], 400),
    ("POST", START, [("Content-Type", "\u00a0application/x-www-form-urlencoded")], 400),
    # distribution's PatchBlobData answers 500 to any other Content-Type than this one (or none).
    ("PATCH", UPLOAD, [("Content-Type", "application/octet-stream; x=y"), ("Content-Length", "3")], 415),
    ("PATCH", UPLOAD, [("Content-Type", "text/plain"), ("Content-Length", "3")], 415),
    # Framing: only chunked, one length, bodies only where a route takes them.
    ("PATCH", UPLOAD, [("Transfer-Encoding", "gzip, chunked")], 400),
    ("PATCH", UPLOAD, [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], 400),
    ("PATCH", UPLOAD, [("Transfer-Encoding", "identity")], 400),
    ("PATCH", UPLOAD, [("Content-Length", "1"), ("Content-Length", "1")], 400),
    ("PATCH", UPLOAD, [("Content-Length", "+1")], 400),
    ("PATCH", UPLOAD, [("Content-Length", "\u0661")], 400),
    ("GET", "/v2/_catalog", [("Content-Length", "1")], 400),
    ("GET", MANIFEST, [("Content-Length", "100000")], 400),
    ("HEAD", MANIFEST, [("Transfer-Encoding", "chunked")], 400),
    ("DELETE", MANIFEST.replace("latest", DIGEST), [("Content-Length", "5")], 400),
    ("GET", f"/v2/alice/x/blobs/{DIGEST}", [("Content-Length", "5")], 400),
    ("GET", "/v2/", [("Transfer-Encoding", "chunked")], 400),
    # Expectations other than 100-continue, as Go answers them.
    ("PATCH", UPLOAD, [("Expect", "foo"), ("Content-Length", "5")], 417),
    ("PATCH", UPLOAD, [("Expect", "100-continue, foo"), ("Content-Length", "5")], 417),
    # An upgrade with a body: aiohttp would stop reading the connection as HTTP.
    ("PATCH", UPLOAD, [("Upgrade", "h2c"), ("Connection", "Upgrade"), ("Content-Length", "5")], 400),
    # Refused before authentication: how the target itself would be read is in doubt.
    ("GET", "/v2/a/%2e%2e/b/manifests/x", [], 400),
]


@pytest.mark.parametrize(("method", "target", "pairs", "status"), REFUSED)
def test_refused(method: str, target: str, pairs: list[tuple[str, str]], status: int) -> None:
    result = screen(method, target, headers(*pairs))
    assert isinstance(result, Refusal), result
    assert result.status == status


def test_ordinary_requests_are_admitted_with_framing_we_set() -> None:
    patch = screen(
        "PATCH", UPLOAD, headers(("Content-Length", "5"), ("Content-Type", "application/octet-stream"))
    )
    assert isinstance(patch, Admitted)
    assert (patch.has_body, patch.content_length, patch.expect_continue, patch.close_after) == (
        True,
        5,
        False,
        False,
    )
    chunked = screen("PATCH", UPLOAD, headers(("Transfer-Encoding", "Chunked")))
    assert isinstance(chunked, Admitted)
    assert (chunked.has_body, chunked.content_length) == (True, None)
    # Content-Encoding crosses as it is, with the bytes as sent: the registry never decodes it.
    gzip = screen("PUT", MANIFEST, headers(("Content-Encoding", "gzip"), ("Content-Length", "9")))
    assert isinstance(gzip, Admitted) and gzip.has_body
    empty = screen("GET", MANIFEST, headers(("Content-Length", "0")))
    assert isinstance(empty, Admitted) and not empty.has_body
    post = screen("POST", START, headers())
    assert isinstance(post, Admitted) and not post.has_body
    manifest = screen(
        "PUT", MANIFEST, headers(("Content-Type", "application/vnd.oci.image.manifest.v1+json; x=y"))
    )
    assert isinstance(manifest, Admitted)


def test_expect_continue_only_with_a_body() -> None:
    with_body = screen("PATCH", UPLOAD, headers(("Expect", "100-Continue"), ("Content-Length", "5")))
    assert isinstance(with_body, Admitted) and with_body.expect_continue
    without = screen("GET", MANIFEST, headers(("Expect", "100-continue")))
    assert isinstance(without, Admitted) and not without.expect_continue


def test_upgrade_without_body_is_answered_then_closed() -> None:
    result = screen("GET", "/v2/", headers(("Upgrade", "h2c"), ("Connection", "Upgrade, HTTP2-Settings")))
    assert isinstance(result, Admitted) and result.close_after


def test_route_errors_are_left_for_after_authentication() -> None:
    result = screen("GET", "/v2/a/manifests/.INVALID_MANIFEST_NAME", headers())
    assert isinstance(result, Admitted)
    assert isinstance(result.operation, RouteError)
    assert (result.operation.status, result.operation.code) == (404, "MANIFEST_UNKNOWN")
    # ... but a body where no route takes one is refused whatever the route.
    assert isinstance(screen("GET", "/v2/nowhere/x", headers(("Content-Length", "3"))), Refusal)


def test_mount_in_query_only() -> None:
    result = screen("POST", f"{START}?mount={DIGEST}&from=secret%2Fhidden", headers())
    assert isinstance(result, Admitted) and isinstance(result.operation, Operation)
    assert result.operation.mount_from == "secret/hidden"


@pytest.mark.parametrize(
    ("params", "expected"),
    [({}, (None, None)), ({"n": "5"}, (5, None)), ({"n": "", "last": "a/b"}, (None, "a/b"))],
)
def test_catalog_paging(params: dict[str, str], expected: tuple[int | None, str | None]) -> None:
    assert catalog.parse_paging(params) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"n": "\u00b2"},  # a superscript two: str.isdigit() is true, int() fails
        {"n": "\uff11"},  # a full-width one: int() reads it as 1
        {"n": "9" * 5000},
        {"n": "0"},
        {"n": "-1"},
        {"n": " 5"},
        {"n": "10001"},
        {"last": "name\n"},  # Python's `$` matches before a final newline
        {"last": "Name"},
        {"last": "a" * 256},
    ],
)
def test_catalog_paging_refused(params: dict[str, str]) -> None:
    with pytest.raises(catalog.CatalogError) as refused:
        catalog.parse_paging(params)
    assert 400 <= refused.value.status < 500
