"""Table tests of the route parser: every distribution v2 endpoint, and hostile targets refused."""

from __future__ import annotations

import pytest

from gateway.routes import (
    DELETE,
    PULL,
    PUSH,
    Operation,
    Route,
    RouteError,
    parse_query,
    parse_request,
)

DIGEST = "sha256:" + "a" * 64
UUID = "3f2a7c1e-8b1d-4d1e-9c4b-2a1f0e9d8c7b"

ALLOWED = [
    # method, target, route, repository, reference, actions
    ("GET", "/v2/", Route.BASE, None, None, set()),
    ("HEAD", "/v2/", Route.BASE, None, None, set()),
    ("GET", "/v2", Route.BASE, None, None, set()),
    ("GET", "/v2/_catalog", Route.CATALOG, None, None, {"*"}),
    ("GET", "/v2/_catalog?n=10&last=abc", Route.CATALOG, None, None, {"*"}),
    ("GET", "/v2/library/busybox/tags/list", Route.TAGS, "library/busybox", None, {PULL}),
    ("GET", "/v2/a/tags/list?n=2&last=b", Route.TAGS, "a", None, {PULL}),
    ("GET", "/v2/foo/manifests/latest", Route.MANIFEST, "foo", "latest", {PULL}),
    ("HEAD", "/v2/foo/manifests/v1.2_3-rc", Route.MANIFEST, "foo", "v1.2_3-rc", {PULL}),
    ("PUT", "/v2/foo/manifests/latest", Route.MANIFEST, "foo", "latest", {PULL, PUSH}),
    ("DELETE", f"/v2/foo/manifests/{DIGEST}", Route.MANIFEST, "foo", DIGEST, {DELETE}),
    ("GET", f"/v2/a/b/c/manifests/{DIGEST}", Route.MANIFEST, "a/b/c", DIGEST, {PULL}),
    ("GET", f"/v2/foo/blobs/{DIGEST}", Route.BLOB, "foo", DIGEST, {PULL}),
    ("HEAD", f"/v2/foo/blobs/{DIGEST}", Route.BLOB, "foo", DIGEST, {PULL}),
    ("DELETE", f"/v2/foo/blobs/{DIGEST}", Route.BLOB, "foo", DIGEST, {DELETE}),
    ("POST", "/v2/foo/blobs/uploads/", Route.UPLOAD_START, "foo", None, {PULL, PUSH}),
    ("POST", f"/v2/foo/blobs/uploads/?digest={DIGEST}", Route.UPLOAD_START, "foo", None, {PULL, PUSH}),
    ("GET", f"/v2/foo/blobs/uploads/{UUID}", Route.UPLOAD, "foo", UUID, {PULL}),
    ("HEAD", f"/v2/foo/blobs/uploads/{UUID}", Route.UPLOAD, "foo", UUID, {PULL}),
    ("PATCH", f"/v2/foo/blobs/uploads/{UUID}?_state=abc%3D%3D", Route.UPLOAD, "foo", UUID, {PULL, PUSH}),
    (
        "PUT",
        f"/v2/foo/blobs/uploads/{UUID}?_state=x&digest={DIGEST}",
        Route.UPLOAD,
        "foo",
        UUID,
        {PULL, PUSH},
    ),
    ("DELETE", f"/v2/foo/blobs/uploads/{UUID}", Route.UPLOAD, "foo", UUID, {DELETE}),
    ("GET", f"/v2/foo/referrers/{DIGEST}", Route.REFERRERS, "foo", DIGEST, {PULL}),
    # Names that contain route words split where distribution splits them (greedy name).
    ("GET", "/v2/a/manifests/b/manifests/c", Route.MANIFEST, "a/manifests/b", "c", {PULL}),
    ("GET", "/v2/a/blobs/tags/list", Route.TAGS, "a/blobs", None, {PULL}),
    ("GET", "/v2/my-org/my__repo.x/manifests/1.0", Route.MANIFEST, "my-org/my__repo.x", "1.0", {PULL}),
]


@pytest.mark.parametrize(("method", "target", "route", "repository", "reference", "actions"), ALLOWED)
def test_endpoints(
    method: str,
    target: str,
    route: Route,
    repository: str | None,
    reference: str | None,
    actions: set[str],
) -> None:
    result = parse_request(method, target)
    assert isinstance(result, Operation), result
    assert (result.route, result.repository, result.reference, set(result.actions)) == (
        route,
        repository,
        reference,
        actions,
    )


def test_mount_records_source_repository() -> None:
    result = parse_request("POST", f"/v2/dst/blobs/uploads/?mount={DIGEST}&from=library%2Fsrc")
    assert isinstance(result, Operation)
    assert result.mount_from == "library/src"
    assert result.repository == "dst"


REFUSED = [
    # method, target, status, code
    ("GET", "/v2/a/../b/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a/%2e%2e/b/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a/%2E%2E/b/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a%2Fb/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a%2fb/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a/./b/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2//a/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a//b/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a\\b/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/Upper/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/" + "a" * 256 + "/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/" + "a/" * 150 + "b/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/-a/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a-/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a/manifests/.hidden", 400, "NAME_INVALID"),
    ("GET", "/v2/a/manifests/" + "t" * 129, 400, "NAME_INVALID"),
    ("GET", "/v2/a/blobs/notadigest", 400, "NAME_INVALID"),
    ("GET", "/v2/a/manifests/x;y", 400, "NAME_INVALID"),
    ("GET", "/v2/a b/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/caf\u00e9/manifests/x", 400, "NAME_INVALID"),
    ("GET", "/v2/a/manifests/x/", 404, "NOT_FOUND"),
    ("GET", "/v2/a/manifests/x%00", 400, "NAME_INVALID"),
    ("GET", "/v2/a/unknown/x", 404, "NOT_FOUND"),
    ("GET", "/v1/search", 404, "NOT_FOUND"),
    ("GET", "/", 404, "NOT_FOUND"),
    ("GET", "/debug/vars", 404, "NOT_FOUND"),
    ("GET", "/v2x/", 404, "NOT_FOUND"),
    ("POST", "/v2/a/manifests/latest", 405, "UNSUPPORTED"),
    ("PATCH", "/v2/a/tags/list", 405, "UNSUPPORTED"),
    ("PUT", "/v2/_catalog", 405, "UNSUPPORTED"),
    ("FOO", "/v2/", 405, "UNSUPPORTED"),
    ("TRACE", f"/v2/a/blobs/{DIGEST}", 405, "UNSUPPORTED"),
    ("GET", "/v2/a/tags/list?n=1&n=2", 400, "UNSUPPORTED"),
    ("GET", "/v2/a/tags/list?n=1;last=b", 400, "UNSUPPORTED"),
    ("GET", "/v2/a/tags/list?n=%zz", 400, "UNSUPPORTED"),
    ("POST", f"/v2/a/blobs/uploads/?mount={DIGEST}&from=../b", 400, "NAME_INVALID"),
    ("POST", f"/v2/a/blobs/uploads/?mount={DIGEST}&from=B", 400, "NAME_INVALID"),
    ("POST", f"/v2/a/blobs/uploads/?mount={DIGEST}", 400, "NAME_INVALID"),
    ("GET", "/v2/" + "a" * 9000, 414, "UNSUPPORTED"),
]


@pytest.mark.parametrize(("method", "target", "status", "code"), REFUSED)
def test_refused(method: str, target: str, status: int, code: str) -> None:
    result = parse_request(method, target)
    assert isinstance(result, RouteError), result
    assert (result.status, result.code) == (status, code)


def test_longest_valid_name_is_accepted() -> None:
    name = "a" * 255
    assert isinstance(parse_request("GET", f"/v2/{name}/tags/list"), Operation)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {}),
        ("n=1&last=b", {"n": "1", "last": "b"}),
        ("from=a%2Fb&mount=x", {"from": "a/b", "mount": "x"}),
        ("a=1+2", {"a": "1 2"}),
        ("flag", {"flag": ""}),
        ("a=1&&b=2", {"a": "1", "b": "2"}),
    ],
)
def test_query(query: str, expected: dict[str, str]) -> None:
    assert parse_query(query) == expected


@pytest.mark.parametrize("query", ["a=1&a=2", "a=%G0", "a=1;b=2", "a=\u00e9", "a= b"])
def test_query_refused(query: str) -> None:
    assert isinstance(parse_query(query), RouteError)
