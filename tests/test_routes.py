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
    assert result.target == f"/v2/dst/blobs/uploads/?mount={DIGEST}&from=library%2Fsrc"


@pytest.mark.parametrize(
    "query",
    [f"mount={DIGEST}", f"mount={DIGEST}&from=", "from=library%2Fsrc", "mount=&from=a", f"m%6Funt={DIGEST}"],
)
def test_mount_that_distribution_would_not_attempt_is_an_ordinary_upload(query: str) -> None:
    """distribution mounts only when `mount` and `from` are both non-empty; otherwise it starts an
    ordinary upload (202), and so do we, without the parameters that could not mount."""
    result = parse_request("POST", f"/v2/dst/blobs/uploads/?{query}&x=1")
    assert isinstance(result, Operation)
    assert result.mount_from is None
    assert result.target == "/v2/dst/blobs/uploads/?x=1"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/dst/tags/list"),
        ("HEAD", "/v2/dst/manifests/1"),
        ("PUT", "/v2/dst/manifests/1"),
        ("GET", f"/v2/dst/blobs/{DIGEST}"),
        ("PATCH", "/v2/dst/blobs/uploads/abc"),
        ("PUT", "/v2/dst/blobs/uploads/abc"),
    ],
)
def test_mount_parameters_never_reach_other_routes(method: str, path: str) -> None:
    """They do nothing there, but a registry checking tokens itself reads `from` on every
    repository route (r.FormValue in app.authorized) and demands pull on it."""
    result = parse_request(method, f"{path}?mount={DIGEST}&n=1&fr%6Fm=library%2Fsrc")
    assert isinstance(result, Operation)
    assert result.mount_from is None
    assert result.target == f"{path}?n=1"


# A digest as go-digest's digest.Parse takes it, and what distribution 2.8 would do otherwise.
SHA384 = "sha384:" + "b" * 96
SHA512 = "sha512:" + "c" * 128


@pytest.mark.parametrize("reference", [DIGEST, SHA384, SHA512])
def test_digests_distribution_accepts(reference: str) -> None:
    for route in ("manifests", "blobs"):
        result = parse_request("GET", f"/v2/a/{route}/{reference}")
        assert isinstance(result, Operation), result
        assert result.reference == reference


# method, target, status, code, answered after authentication
REFUSED = [
    # How the target would be read is in doubt: refused at once, before authentication.
    ("GET", "/v2/a/../b/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/a/%2e%2e/b/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/a/%2E%2E/b/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/a%2Fb/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/a%2fb/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/a/./b/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2//a/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/a//b/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/a\\b/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/a/manifests/x;y", 400, "NAME_INVALID", False),
    ("GET", "/v2/a b/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/caf\u00e9/manifests/x", 400, "NAME_INVALID", False),
    ("GET", "/v2/a/manifests/x\n", 400, "NAME_INVALID", False),
    ("GET", "/v2/a/manifests/x%00", 400, "NAME_INVALID", False),
    ("GET", "/v2/a/tags/list?n=1&n=2", 400, "UNSUPPORTED", False),
    ("GET", "/v2/a/tags/list?n=1;last=b", 400, "UNSUPPORTED", False),
    ("GET", "/v2/a/tags/list?n=%zz", 400, "UNSUPPORTED", False),
    ("GET", "/v2/a/tags/list?n=1#x", 400, "UNSUPPORTED", False),
    ("GET", "/v2/" + "a" * 9000, 414, "UNSUPPORTED", False),
    # Well-formed requests that name no operation: answered only to a client that authenticated.
    ("GET", "/v2/Upper/manifests/x", 400, "NAME_INVALID", True),
    ("GET", "/v2/" + "a" * 256 + "/manifests/x", 400, "NAME_INVALID", True),
    ("GET", "/v2/" + "a/" * 150 + "b/manifests/x", 400, "NAME_INVALID", True),
    ("GET", "/v2/-a/manifests/x", 400, "NAME_INVALID", True),
    ("GET", "/v2/a-/manifests/x", 400, "NAME_INVALID", True),
    ("GET", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN", True),
    ("HEAD", "/v2/a/manifests/.hidden", 404, "MANIFEST_UNKNOWN", True),
    ("GET", "/v2/a/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN", True),
    ("GET", "/v2/a/blobs/notadigest", 404, "BLOB_UNKNOWN", True),
    ("GET", "/v2/a/blobs/uploads/a:b", 404, "BLOB_UPLOAD_UNKNOWN", True),
    ("GET", "/v2/a/manifests/x/", 404, "NOT_FOUND", True),
    ("GET", "/v2/a/unknown/x", 404, "NOT_FOUND", True),
    ("GET", "/v1/search", 404, "NOT_FOUND", True),
    ("GET", "/", 404, "NOT_FOUND", True),
    ("GET", "/debug/vars", 404, "NOT_FOUND", True),
    ("GET", "/v2x/", 404, "NOT_FOUND", True),
    ("POST", "/v2/a/manifests/latest", 405, "UNSUPPORTED", True),
    ("PATCH", "/v2/a/tags/list", 405, "UNSUPPORTED", True),
    ("PUT", "/v2/_catalog", 405, "UNSUPPORTED", True),
    ("FOO", "/v2/", 405, "UNSUPPORTED", True),
    ("TRACE", f"/v2/a/blobs/{DIGEST}", 405, "UNSUPPORTED", True),
    ("POST", f"/v2/a/blobs/uploads/?mount={DIGEST}&from=../b", 400, "NAME_INVALID", True),
    ("POST", f"/v2/a/blobs/uploads/?mount={DIGEST}&from=B", 400, "NAME_INVALID", True),
    ("POST", f"/v2/a/blobs/uploads/?mount={DIGEST}&from=b%0A", 400, "NAME_INVALID", True),
    # Digest-shaped references distribution 2.8 would not parse as digests. For manifests it reads
    # them as tags and its storage driver answers 500 with its internal path; for blobs 400.
    ("GET", "/v2/a/manifests/sha256:" + "a" * 32, 400, "DIGEST_INVALID", True),
    ("GET", "/v2/a/manifests/foo:" + "a" * 64, 400, "DIGEST_INVALID", True),
    ("GET", "/v2/a/manifests/sha256+b64:" + "a" * 64, 400, "DIGEST_INVALID", True),
    ("GET", "/v2/a/manifests/sha256:" + "A" * 64, 400, "DIGEST_INVALID", True),
    ("GET", "/v2/a/manifests/sha256:" + "a" * 65, 400, "DIGEST_INVALID", True),
    ("GET", "/v2/a/manifests/sha512:" + "a" * 64, 400, "DIGEST_INVALID", True),
    ("DELETE", "/v2/a/manifests/md5:" + "a" * 32, 400, "DIGEST_INVALID", True),
    ("GET", "/v2/a/blobs/sha256:" + "a" * 63, 400, "DIGEST_INVALID", True),
    ("GET", "/v2/a/referrers/sha256:xyz", 400, "DIGEST_INVALID", True),
]


@pytest.mark.parametrize(("method", "target", "status", "code", "after_authentication"), REFUSED)
def test_refused(method: str, target: str, status: int, code: str, after_authentication: bool) -> None:
    result = parse_request(method, target)
    assert isinstance(result, RouteError), result
    assert (result.status, result.code, result.after_authentication) == (status, code, after_authentication)


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
